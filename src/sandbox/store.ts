// The sandbox's records. Kept deliberately lean so a million fit well inside 1 GiB: plain
// objects with few fields, shared string constants for seeded text, timestamps as epoch ms,
// and values that can be derived from the id (display number, seeded email and phone)
// computed on read instead of stored.

export type ObjectName = 'matters' | 'contacts';
export type MatterStatus = 'open' | 'pending' | 'closed';

export interface MatterRecord {
  id: number;
  number: number;
  clientId: number | null;
  practiceAreaId: number | null;
  status: MatterStatus;
  description: string;
  billable: boolean;
  clientReference: string | null;
  location: string | null;
  /** undefined = derived from created_at (seeded records); written values override. */
  openDate?: string | null;
  closeDate?: string | null;
  pendingDate?: string | null;
  createdAt: number;
  updatedAt: number;
  version: number;
  /** Aligned with MATTER_CUSTOM_FIELDS. */
  custom: Array<string | null>;
}

export interface ContactRecord {
  id: number;
  type: 'Person' | 'Company';
  firstName: string | null;
  lastName: string | null;
  /** Company name; for a Person the name is first + last, as Clio computes it. */
  companyName: string | null;
  title: string | null;
  /** undefined = derived from the name and id (seeded records); null = none. */
  email?: string | null;
  phone?: string | null;
  createdAt: number;
  updatedAt: number;
  version: number;
  /** Aligned with CONTACT_CUSTOM_FIELDS. */
  custom: Array<string | null>;
}

export interface PracticeAreaRecord {
  id: number;
  name: string;
  category: string;
  code: string;
  createdAt: number;
  updatedAt: number;
  version: number;
}

export interface CustomFieldDef {
  id: number;
  name: string;
  fieldType: 'text_line' | 'date' | 'currency' | 'picklist' | 'numeric';
}

export const MATTER_CUSTOM_FIELDS: readonly CustomFieldDef[] = [
  { id: 9001, name: 'Intake Source', fieldType: 'text_line' },
  { id: 9002, name: 'Incident Date', fieldType: 'date' },
  { id: 9003, name: 'Estimated Value', fieldType: 'currency' },
];

export const CONTACT_CUSTOM_FIELDS: readonly CustomFieldDef[] = [
  { id: 9101, name: 'Referral Source', fieldType: 'text_line' },
  { id: 9102, name: 'Preferred Language', fieldType: 'text_line' },
];

/** Records kept sorted by id; ids only ever grow, so inserts are appends and lookups binary searches. */
export class Collection<R extends { id: number }> {
  readonly items: R[] = [];
  constructor(public nextId: number) {}

  allocateId(): number {
    return this.nextId++;
  }

  /** Index of the first record whose id is >= `id`. */
  lowerBound(id: number): number {
    let lo = 0;
    let hi = this.items.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((this.items[mid] as R).id < id) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  get(id: number): R | undefined {
    const rec = this.items[this.lowerBound(id)];
    return rec !== undefined && rec.id === id ? rec : undefined;
  }

  append(rec: R): void {
    const last = this.items[this.items.length - 1];
    if (last !== undefined && last.id >= rec.id) throw new Error(`ids must grow: ${rec.id} after ${last.id}`);
    this.items.push(rec);
  }

  remove(id: number): R | undefined {
    const i = this.lowerBound(id);
    const rec = this.items[i];
    if (rec === undefined || rec.id !== id) return undefined;
    this.items.splice(i, 1);
    return rec;
  }

  get size(): number {
    return this.items.length;
  }
}

export class RecordStore {
  // Separate id ranges per object, as Clio's are, so a bridge that mixes them up fails loudly.
  readonly matters = new Collection<MatterRecord>(200_000_001);
  readonly contacts = new Collection<ContactRecord>(100_000_001);
  readonly practiceAreas = new Collection<PracticeAreaRecord>(3_001);
  nextMatterNumber = 1;
}
