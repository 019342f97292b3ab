// Everything the sandbox holds, and every operation the control API offers, as methods, so an
// in-process test can do through `sandbox.state` exactly what an HTTP caller does through
// `/_sandbox/`.
import { Automation } from './automation.js';
import type { AutomationRule, AutomationRuleInput } from './automation.js';
import {
  FULL_CONTACT_FIELDS,
  FULL_MATTER_FIELDS,
  renderContact,
  renderMatter,
} from './clio-render.js';
import type { RenderContext } from './clio-render.js';
import { OAuthStore } from './oauth-store.js';
import type { OAuthClient } from './oauth-store.js';
import { mulberry32 } from './prng.js';
import type { Rng } from './prng.js';
import { RequestLog } from './request-log.js';
import { newContactFromSeed, newMatterFromSeed, PRACTICE_AREAS, seedStore } from './seed-data.js';
import { CONTACT_CUSTOM_FIELDS, MATTER_CUSTOM_FIELDS, RecordStore } from './store.js';
import type { ContactRecord, CustomFieldDef, MatterRecord, MatterStatus, ObjectName } from './store.js';
import { applySwitchesPatch, defaultSwitches } from './switches.js';
import type { SandboxSwitches, SwitchesPatch } from './switches.js';

/** A write the CRM refuses; mapped to Clio's `{"error": {"type", "message"}}` with `status`. */
export class SandboxWriteError extends Error {
  constructor(
    readonly status: 400 | 404 | 412 | 422,
    readonly type: string,
    message: string,
  ) {
    super(message);
  }
}

export interface SandboxStateOptions {
  seed: number;
  records: number;
  clients: OAuthClient[];
  switches?: Partial<SandboxSwitches>;
}

export type WriteInput = Record<string, unknown>;

export class SandboxClock {
  advanceMs = 0;
  /** Real time at which the clock was frozen, so windows and expiries can be tested without waiting. */
  frozenAt: number | null = null;
  constructor(private readonly switches: () => SandboxSwitches) {}

  /** The sandbox's own time: real (or frozen) time, advanced by the control API, skewed by the switch. */
  now(): number {
    const t = (this.frozenAt ?? Date.now()) + this.advanceMs + this.switches().clockSkewSeconds * 1000;
    return this.switches().oneSecondTimestamps ? Math.floor(t / 1000) * 1000 : t;
  }
}

export class SandboxState {
  readonly seed: number;
  readonly store = new RecordStore();
  switches: SandboxSwitches;
  readonly clock: SandboxClock;
  readonly oauth: OAuthStore;
  readonly requestLog = new RequestLog();
  readonly automation: Automation;
  /** Decides injected faults; seeded so a failing run can be replayed. */
  readonly faultRng: Rng;
  readonly renderContext: RenderContext;
  /** Listener addresses, filled in by startSandbox. */
  url = '';

  constructor(opts: SandboxStateOptions) {
    this.seed = opts.seed;
    this.switches = applySwitchesPatch(defaultSwitches(), opts.switches ?? {});
    const sw = () => this.switches;
    this.clock = new SandboxClock(sw);
    this.oauth = new OAuthStore(opts.clients, () => this.clock.now(), sw);
    this.automation = new Automation(opts.seed, sw, () => this.clock.now());
    this.faultRng = mulberry32(opts.seed ^ 0x5eed5eed);
    this.renderContext = {
      store: this.store,
      formatTime: (ms) => {
        const iso = new Date(ms).toISOString();
        return this.switches.oneSecondTimestamps ? `${iso.slice(0, 19)}Z` : iso;
      },
    };
    seedStore(this.store, opts.seed, opts.records);
  }

  // ---- switches and clock -------------------------------------------------------------------

  setSwitches(patch: SwitchesPatch | Record<string, unknown>): SandboxSwitches {
    this.switches = applySwitchesPatch(this.switches, patch);
    return this.switches;
  }

  resetSwitches(): SandboxSwitches {
    this.switches = defaultSwitches();
    return this.switches;
  }

  setClock(change: { skewSeconds?: number; advanceSeconds?: number; frozen?: boolean }): { now: string; skewSeconds: number; advancedSeconds: number; frozen: boolean } {
    if (change.skewSeconds !== undefined) this.setSwitches({ clockSkewSeconds: change.skewSeconds });
    if (change.frozen === true && this.clock.frozenAt === null) this.clock.frozenAt = Date.now();
    if (change.frozen === false && this.clock.frozenAt !== null) {
      // Thawing keeps the sandbox time continuous: the frozen span becomes a negative advance.
      this.clock.advanceMs -= Date.now() - this.clock.frozenAt;
      this.clock.frozenAt = null;
    }
    if (change.advanceSeconds !== undefined) this.clock.advanceMs += change.advanceSeconds * 1000;
    return this.clockInfo();
  }

  clockInfo(): { now: string; skewSeconds: number; advancedSeconds: number; frozen: boolean } {
    return {
      now: new Date(this.clock.now()).toISOString(),
      skewSeconds: this.switches.clockSkewSeconds,
      advancedSeconds: this.clock.advanceMs / 1000,
      frozen: this.clock.frozenAt !== null,
    };
  }

  /** Timestamps compare as the API shows them, so one-second granularity affects filters too. */
  visibleTime(ms: number): number {
    return this.switches.oneSecondTimestamps ? Math.floor(ms / 1000) * 1000 : ms;
  }

  // ---- records ------------------------------------------------------------------------------

  renderFull(object: ObjectName, id: number): Record<string, unknown> | null {
    if (object === 'matters') {
      const m = this.store.matters.get(id);
      return m ? renderMatter(m, FULL_MATTER_FIELDS, this.renderContext) : null;
    }
    const c = this.store.contacts.get(id);
    return c ? renderContact(c, FULL_CONTACT_FIELDS, this.renderContext) : null;
  }

  createRecord(object: ObjectName, data: WriteInput): MatterRecord | ContactRecord {
    const now = this.clock.now();
    const rec = object === 'matters' ? this.buildMatter(data, now) : this.buildContact(data, now);
    if (object === 'matters') this.store.matters.append(rec as MatterRecord);
    else this.store.contacts.append(rec as ContactRecord);
    this.fire(object, 'created', rec.id);
    return rec;
  }

  updateRecord(object: ObjectName, id: number, data: WriteInput, ifMatch?: string): MatterRecord | ContactRecord {
    const rec = object === 'matters' ? this.store.matters.get(id) : this.store.contacts.get(id);
    if (!rec) throw new SandboxWriteError(404, 'RecordNotFound', `${object === 'matters' ? 'Matter' : 'Contact'} ${id} not found`);
    if (ifMatch !== undefined) {
      const current = this.renderFull(object, id)?.etag;
      if (ifMatch !== current) throw new SandboxWriteError(412, 'PreconditionFailed', 'The record has changed since the given etag');
    }
    if (object === 'matters') this.applyMatter(rec as MatterRecord, data);
    else this.applyContact(rec as ContactRecord, data);
    rec.version++;
    rec.updatedAt = this.clock.now();
    this.fire(object, 'updated', id);
    return rec;
  }

  deleteRecord(object: ObjectName, id: number): void {
    const full = this.renderFull(object, id);
    if (!full) throw new SandboxWriteError(404, 'RecordNotFound', `${object === 'matters' ? 'Matter' : 'Contact'} ${id} not found`);
    // A hard delete: no tombstone, no deleted_at. Only a hook or an id-set sweep can notice.
    if (object === 'matters') this.store.matters.remove(id);
    else this.store.contacts.remove(id);
    this.automation.trigger(object, 'deleted', id, full);
  }

  /**
   * A spreadsheet import: `count` new records all stamped with one `updated_at` (and created_at).
   * Imports bypass the automation unless asked, as bulk tools commonly do.
   */
  bulkImport(opts: { object: ObjectName; count: number; updatedAt?: string; fireAutomation?: boolean }): {
    object: ObjectName;
    count: number;
    firstId: number | null;
    lastId: number | null;
    updatedAt: string;
  } {
    const at = opts.updatedAt === undefined ? this.clock.now() : Date.parse(opts.updatedAt);
    if (!Number.isFinite(at)) throw new SandboxWriteError(400, 'BadRequest', 'updatedAt is not an ISO-8601 time');
    const rng = mulberry32(this.seed ^ (this.store.matters.nextId + this.store.contacts.nextId));
    const ids: number[] = [];
    for (let i = 0; i < opts.count; i++) {
      if (opts.object === 'contacts') {
        const rec = newContactFromSeed(rng, this.store.contacts.allocateId(), at, at);
        this.store.contacts.append(rec);
        ids.push(rec.id);
      } else {
        const clients = this.store.contacts.items;
        const client = clients.length ? clients[Math.floor(rng() * clients.length)] : undefined;
        const paIndex = Math.floor(rng() * PRACTICE_AREAS.length);
        const pa = this.store.practiceAreas.items[paIndex];
        const rec = newMatterFromSeed(rng, this.store.matters.allocateId(), this.store.nextMatterNumber++, client?.id ?? null, pa?.id ?? null, paIndex, at, at);
        this.store.matters.append(rec);
        ids.push(rec.id);
      }
    }
    if (opts.fireAutomation) for (const id of ids) this.fire(opts.object, 'created', id);
    return { object: opts.object, count: ids.length, firstId: ids[0] ?? null, lastId: ids[ids.length - 1] ?? null, updatedAt: new Date(at).toISOString() };
  }

  // ---- automation and tokens ----------------------------------------------------------------

  addAutomationRule(input: AutomationRuleInput): AutomationRule {
    return this.automation.addRule(input);
  }

  automationIdle(): Promise<void> {
    return this.automation.idle();
  }

  /** Revokes one grant, or every grant when no id is given. */
  revokeTokens(grantId?: string): number {
    if (grantId === undefined) return this.oauth.revokeAllGrants('revoked through the control API');
    return this.oauth.revokeGrant(grantId, 'revoked through the control API') ? 1 : 0;
  }

  expireAccessTokens(grantId?: string): number {
    return this.oauth.expireAccessTokens(grantId);
  }

  issueToken(clientId = this.oauth.clients.keys().next().value ?? 'sandbox-client') {
    return this.oauth.issueDirect(clientId);
  }

  // ---- internals ----------------------------------------------------------------------------

  private fire(object: ObjectName, event: 'created' | 'updated', id: number): void {
    if (this.automation.rules.length === 0) return;
    const full = this.renderFull(object, id);
    if (full) this.automation.trigger(object, event, id, full);
  }

  private buildMatter(data: WriteInput, now: number): MatterRecord {
    if (typeof data.description !== 'string' || data.description === '') {
      throw new SandboxWriteError(422, 'UnprocessableEntity', "description can't be blank");
    }
    if (!isObject(data.client) || typeof data.client.id !== 'number') {
      throw new SandboxWriteError(422, 'UnprocessableEntity', 'client.id is required');
    }
    const rec: MatterRecord = {
      id: 0,
      number: 0,
      clientId: null,
      practiceAreaId: null,
      status: 'open',
      description: '',
      billable: true,
      clientReference: null,
      location: null,
      createdAt: now,
      updatedAt: now,
      version: 1,
      custom: MATTER_CUSTOM_FIELDS.map(() => null),
    };
    this.applyMatter(rec, data);
    rec.id = this.store.matters.allocateId();
    rec.number = this.store.nextMatterNumber++;
    return rec;
  }

  private applyMatter(rec: MatterRecord, data: WriteInput): void {
    for (const [key, value] of Object.entries(data)) {
      switch (key) {
        case 'description':
          rec.description = requireString(key, value);
          break;
        case 'status':
          // The asymmetry the docs hide: reads say "Open", writes must say "open".
          if (value !== 'open' && value !== 'pending' && value !== 'closed') {
            throw new SandboxWriteError(422, 'UnprocessableEntity', `status is not included in the list: ${JSON.stringify(value)}`);
          }
          if (value !== rec.status) {
            const today = new Date(this.clock.now()).toISOString().slice(0, 10);
            if (value === 'closed') rec.closeDate = today;
            if (value === 'pending') rec.pendingDate = today;
          }
          rec.status = value as MatterStatus;
          break;
        case 'client': {
          if (!isObject(value) || typeof value.id !== 'number') throw new SandboxWriteError(422, 'UnprocessableEntity', 'client.id must be an integer');
          if (!this.store.contacts.get(value.id)) throw new SandboxWriteError(422, 'UnprocessableEntity', `client ${value.id} does not exist`);
          rec.clientId = value.id;
          break;
        }
        case 'practice_area': {
          if (value === null) rec.practiceAreaId = null;
          else if (isObject(value) && typeof value.id === 'number' && this.store.practiceAreas.get(value.id)) rec.practiceAreaId = value.id;
          else throw new SandboxWriteError(422, 'UnprocessableEntity', 'practice_area.id does not exist');
          break;
        }
        case 'billable':
          if (typeof value !== 'boolean') throw new SandboxWriteError(422, 'UnprocessableEntity', 'billable must be a boolean');
          rec.billable = value;
          break;
        case 'client_reference':
          rec.clientReference = optionalString(key, value);
          break;
        case 'location':
          rec.location = optionalString(key, value);
          break;
        case 'open_date':
          rec.openDate = optionalDate(key, value);
          break;
        case 'close_date':
          rec.closeDate = optionalDate(key, value);
          break;
        case 'pending_date':
          rec.pendingDate = optionalDate(key, value);
          break;
        case 'custom_field_values':
          applyCustomFields(rec.custom, MATTER_CUSTOM_FIELDS, value);
          break;
        default:
          // Clio ignores attributes it does not know or that are read-only (id, etag, ...).
          break;
      }
    }
  }

  private buildContact(data: WriteInput, now: number): ContactRecord {
    if (data.type !== 'Person' && data.type !== 'Company') {
      throw new SandboxWriteError(422, 'UnprocessableEntity', 'type must be "Person" or "Company"');
    }
    const rec: ContactRecord = {
      id: 0,
      type: data.type,
      firstName: null,
      lastName: null,
      companyName: null,
      title: null,
      email: null,
      phone: null,
      createdAt: now,
      updatedAt: now,
      version: 1,
      custom: CONTACT_CUSTOM_FIELDS.map(() => null),
    };
    this.applyContact(rec, data);
    if (rec.type === 'Company' ? !rec.companyName : !rec.firstName && !rec.lastName) {
      throw new SandboxWriteError(422, 'UnprocessableEntity', "name can't be blank");
    }
    rec.id = this.store.contacts.allocateId();
    return rec;
  }

  private applyContact(rec: ContactRecord, data: WriteInput): void {
    for (const [key, value] of Object.entries(data)) {
      switch (key) {
        case 'name': {
          const name = requireString(key, value);
          if (rec.type === 'Company') rec.companyName = name;
          else {
            const parts = name.trim().split(/\s+/);
            rec.lastName = parts.length > 1 ? (parts.pop() ?? null) : null;
            rec.firstName = parts.join(' ') || null;
          }
          break;
        }
        case 'first_name':
          rec.firstName = optionalString(key, value);
          break;
        case 'last_name':
          rec.lastName = optionalString(key, value);
          break;
        case 'title':
          rec.title = optionalString(key, value);
          break;
        case 'email_addresses':
          rec.email = firstOf(value, 'address', 'default_email');
          break;
        case 'phone_numbers':
          rec.phone = firstOf(value, 'number', 'default_number');
          break;
        case 'custom_field_values':
          applyCustomFields(rec.custom, CONTACT_CUSTOM_FIELDS, value);
          break;
        default:
          break;
      }
    }
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function requireString(key: string, v: unknown): string {
  if (typeof v !== 'string') throw new SandboxWriteError(422, 'UnprocessableEntity', `${key} must be a string`);
  return v;
}

function optionalString(key: string, v: unknown): string | null {
  return v === null ? null : requireString(key, v);
}

function optionalDate(key: string, v: unknown): string | null {
  const s = optionalString(key, v);
  if (s !== null && !/^\d{4}-\d{2}-\d{2}$/.test(s)) throw new SandboxWriteError(422, 'UnprocessableEntity', `${key} must be an ISO-8601 date`);
  return s;
}

/** Clio keeps several emails/phones; the sandbox keeps the default (or first) one. */
function firstOf(v: unknown, valueKey: string, defaultKey: string): string | null {
  if (!Array.isArray(v)) throw new SandboxWriteError(422, 'UnprocessableEntity', `expected an array of ${valueKey}`);
  const items = v.filter(isObject);
  const chosen = items.find((i) => i[defaultKey] === true) ?? items[0];
  if (!chosen) return null;
  return requireString(valueKey, chosen[valueKey]);
}

function applyCustomFields(target: Array<string | null>, defs: readonly CustomFieldDef[], v: unknown): void {
  if (!Array.isArray(v)) throw new SandboxWriteError(422, 'UnprocessableEntity', 'custom_field_values must be an array');
  for (const item of v) {
    const id = isObject(item) && isObject(item.custom_field) ? item.custom_field.id : undefined;
    const i = defs.findIndex((d) => d.id === id);
    if (i < 0 || !isObject(item)) throw new SandboxWriteError(422, 'UnprocessableEntity', `custom_field ${String(id)} does not exist`);
    target[i] = item.value === null ? null : requireString('custom_field_values.value', item.value);
  }
}
