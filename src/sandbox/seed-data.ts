import { hashInts, mulberry32, pick } from './prng.js';
import type { Rng } from './prng.js';
import type { ContactRecord, MatterRecord, MatterStatus, RecordStore } from './store.js';

const FIRST_NAMES = [
  'Maria', 'James', 'Aisha', 'Wei', 'Carlos', 'Priya', 'John', 'Fatima', 'Liam', 'Olivia', 'Noah',
  'Sofia', 'Mateo', 'Chloe', 'Ethan', 'Amara', 'Lucas', 'Hannah', 'Diego', 'Grace', 'Omar', 'Elena',
  'Samuel', 'Yuki', 'Daniel', 'Zoe', 'Kwame', 'Isabel', 'Henry', 'Leila', 'Victor', 'Nora', 'Arjun',
  'Ruth', 'Tomasz', 'Mei', 'Patrick', 'Ingrid', 'Rafael', 'Naomi',
] as const;

const LAST_NAMES = [
  'Garcia', 'Smith', 'Nguyen', 'Okafor', 'Patel', 'Johnson', 'Kim', 'Hernandez', 'Brown', 'Cohen',
  'Rossi', 'Novak', 'Williams', 'Haddad', 'Silva', 'Murphy', 'Tanaka', 'Lopez', 'Andersen', 'Walker',
  'Mensah', 'Dubois', 'Fischer', 'Khan', 'Martin', 'Ivanova', 'Reyes', 'Chen', "O'Brien", 'Singh',
] as const;

const COMPANY_WORDS = [
  'Harbor', 'Summit', 'Granite', 'Bluebird', 'Cedar', 'Northwind', 'Keystone', 'Riverside',
  'Ironwood', 'Lakeshore', 'Pioneer', 'Redwood', 'Silverline', 'Meridian', 'Oakridge',
] as const;
const COMPANY_KINDS = ['Logistics', 'Builders', 'Dental', 'Foods', 'Holdings', 'Software', 'Realty', 'Motors'] as const;
const COMPANY_SUFFIXES = ['LLC', 'Inc.', 'Ltd.', 'Co.', 'LLP'] as const;
const TITLES = ['', '', '', 'Dr.', 'Owner', 'Office Manager', 'CFO'] as const;

export const PRACTICE_AREAS = [
  { name: 'Personal Injury', category: 'personal_injury', code: 'PI' },
  { name: 'Family Law', category: 'family', code: 'FAM' },
  { name: 'Employment', category: 'employment_and_labor', code: 'EMP' },
  { name: 'Immigration', category: 'immigration', code: 'IMM' },
  { name: 'Criminal Defense', category: 'criminal', code: 'CRIM' },
  { name: 'Estate Planning', category: 'wills_and_estates', code: 'EST' },
  { name: 'Real Estate', category: 'real_estate', code: 'RE' },
  { name: 'Bankruptcy', category: 'bankruptcy', code: 'BK' },
  { name: 'Business Formation', category: 'business_formation_and_compliance', code: 'BUS' },
  { name: "Workers' Compensation", category: 'workers_compensation', code: 'WC' },
  { name: 'Medical Malpractice', category: 'medical_malpractice', code: 'MED' },
  { name: 'Civil Litigation', category: 'civil_litigation', code: 'CIV' },
] as const;

// Indexed like PRACTICE_AREAS; shared string constants cost nothing per record.
const DESCRIPTIONS: readonly (readonly string[])[] = [
  ['Rear-end collision on the interstate; client has neck and back injuries.', 'Slip and fall in a grocery store; fractured wrist.', 'Dog bite at a neighbour\'s property; medical bills outstanding.'],
  ['Uncontested divorce with shared custody of two children.', 'Modification of child support after job loss.', 'Adoption of stepchild.'],
  ['Wrongful termination after reporting safety violations.', 'Unpaid overtime for warehouse staff.', 'Severance agreement review.'],
  ['Family-based green card petition.', 'H-1B transfer for software engineer.', 'Asylum application, initial consultation done.'],
  ['DUI first offence; license suspension hearing pending.', 'Misdemeanour shoplifting charge.', 'Expungement of a 2015 conviction.'],
  ['Revocable living trust and pour-over will.', 'Probate of father\'s estate.', 'Power of attorney and health care directive.'],
  ['Residential purchase closing.', 'Commercial lease negotiation for a retail unit.', 'Boundary dispute with neighbour.'],
  ['Chapter 7 filing for an individual.', 'Chapter 13 repayment plan.', 'Creditor claim in a customer\'s bankruptcy.'],
  ['Formation of a two-member LLC with operating agreement.', 'Annual compliance and minutes.', 'Shareholder agreement for a startup.'],
  ['Back injury on a construction site; claim denied by insurer.', 'Repetitive strain injury claim.', 'Appeal of benefits termination.'],
  ['Surgical error during routine procedure.', 'Misdiagnosis at urgent care.', 'Birth injury claim, records requested.'],
  ['Breach of contract against a supplier.', 'Defamation claim over online reviews.', 'Small claims appeal.'],
];

const INTAKE_SOURCES = ['Web form', 'Phone', 'Referral', 'Walk-in', 'AI intake agent', 'Google Ads'] as const;
const LANGUAGES = ['English', 'Spanish', 'Mandarin', 'Vietnamese', 'Arabic', 'French'] as const;
const STATUSES: readonly MatterStatus[] = ['open', 'open', 'open', 'pending', 'closed'];

// Fixed, not `Date.now()`: the same seed must give byte-identical data on any day.
export const SEED_START_MS = Date.UTC(2023, 0, 1);
export const SEED_END_MS = Date.UTC(2025, 5, 1);

export function practiceAreaDescriptions(index: number): readonly string[] {
  return DESCRIPTIONS[index % DESCRIPTIONS.length] ?? [];
}

export function newContactFromSeed(rng: Rng, id: number, createdAt: number, updatedAt: number): ContactRecord {
  const isCompany = rng() < 0.2;
  return {
    id,
    type: isCompany ? 'Company' : 'Person',
    firstName: isCompany ? null : pick(rng, FIRST_NAMES),
    lastName: isCompany ? null : pick(rng, LAST_NAMES),
    companyName: isCompany ? `${pick(rng, COMPANY_WORDS)} ${pick(rng, COMPANY_KINDS)} ${pick(rng, COMPANY_SUFFIXES)}` : null,
    title: pick(rng, TITLES) || null,
    createdAt,
    updatedAt,
    version: 1,
    custom: [pick(rng, INTAKE_SOURCES), pick(rng, LANGUAGES)],
  };
}

export function newMatterFromSeed(
  rng: Rng,
  id: number,
  number: number,
  clientId: number | null,
  practiceAreaId: number | null,
  practiceAreaIndex: number,
  createdAt: number,
  updatedAt: number,
): MatterRecord {
  const incident = createdAt - Math.floor(rng() * 400) * 86_400_000;
  return {
    id,
    number,
    clientId,
    practiceAreaId,
    status: pick(rng, STATUSES),
    description: pick(rng, practiceAreaDescriptions(practiceAreaIndex)),
    billable: rng() < 0.9,
    clientReference: null,
    location: null,
    createdAt,
    updatedAt,
    version: 1,
    custom: [pick(rng, INTAKE_SOURCES), new Date(incident).toISOString().slice(0, 10), String(Math.floor(rng() * 200) * 500)],
  };
}

/**
 * Fills the store: practice areas, then `records` records split evenly between contacts and
 * matters (contacts first, so every matter has a client). created_at grows with id over the
 * seed window; updated_at falls somewhere after it.
 */
export function seedStore(store: RecordStore, seed: number, records: number): void {
  const rng = mulberry32(seed);
  PRACTICE_AREAS.forEach((pa, i) => {
    store.practiceAreas.append({
      id: store.practiceAreas.allocateId(),
      ...pa,
      createdAt: SEED_START_MS - (PRACTICE_AREAS.length - i) * 86_400_000,
      updatedAt: SEED_START_MS - (PRACTICE_AREAS.length - i) * 86_400_000,
      version: 1,
    });
  });
  const contactCount = Math.ceil(records / 2);
  const matterCount = records - contactCount;
  const span = SEED_END_MS - SEED_START_MS;
  const stamp = (i: number, n: number): [number, number] => {
    const created = SEED_START_MS + Math.floor(((i + rng()) / Math.max(n, 1)) * span * 0.8);
    const updated = created + Math.floor(rng() * Math.min(90 * 86_400_000, SEED_END_MS - created));
    return [created, updated];
  };
  const firstContactId = store.contacts.nextId;
  for (let i = 0; i < contactCount; i++) {
    const [c, u] = stamp(i, contactCount);
    store.contacts.append(newContactFromSeed(rng, store.contacts.allocateId(), c, u));
  }
  for (let i = 0; i < matterCount; i++) {
    const [c, u] = stamp(i, matterCount);
    const paIndex = Math.floor(rng() * PRACTICE_AREAS.length);
    const pa = store.practiceAreas.items[paIndex];
    const clientId = contactCount > 0 ? firstContactId + Math.floor(rng() * contactCount) : null;
    store.matters.append(
      newMatterFromSeed(rng, store.matters.allocateId(), store.nextMatterNumber++, clientId, pa?.id ?? null, paIndex, c, u),
    );
  }
}

export function contactName(c: ContactRecord): string {
  if (c.type === 'Company') return c.companyName ?? '';
  return [c.firstName, c.lastName].filter((p) => p).join(' ');
}

export function contactEmail(c: ContactRecord): string | null {
  if (c.email !== undefined) return c.email;
  const local = contactName(c).toLowerCase().replace(/[^a-z]+/g, '.');
  return `${local}.${c.id % 100_000}@example.com`;
}

export function contactPhone(c: ContactRecord): string | null {
  if (c.phone !== undefined) return c.phone;
  return `+1 555 ${hashInts(c.id).slice(0, 3).replace(/[a-f]/g, '7')} ${String(c.id % 10_000).padStart(4, '0')}`;
}
