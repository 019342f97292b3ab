// The CRM's automation builder: "when a matter is created, POST to this URL". It fires most of
// the time, may fire twice, may be late, authenticates with a static header secret, and offers an
// HMAC option in its UI that never actually signs anything. Every decision lands in the log so a
// test can count exactly what the bridge had to catch by polling.
import { z } from 'zod';
import { mulberry32 } from './prng.js';
import type { Rng } from './prng.js';
import type { ObjectName } from './store.js';
import type { SandboxSwitches } from './switches.js';

export type AutomationEvent = 'created' | 'updated' | 'deleted';

export const automationRuleInputSchema = z
  .object({
    object: z.enum(['matters', 'contacts']),
    events: z.array(z.enum(['created', 'updated', 'deleted'])).min(1),
    url: z.url(),
    auth: z
      .object({ type: z.enum(['bearer', 'header']), name: z.string().min(1).optional(), value: z.string() })
      .refine((a) => a.type === 'bearer' || a.name !== undefined, { message: 'auth.name is required for type "header"' })
      .nullable()
      .optional(),
    payload: z.enum(['record', 'notification']).default('record'),
    dropRate: z.number().min(0).max(1).optional(),
    duplicateRate: z.number().min(0).max(1).optional(),
    delayMs: z.number().int().min(0).optional(),
    /** The UI's "sign requests" option: stored and shown, never sent. */
    hmacScaffold: z.object({ header: z.string().default('X-Hook-Signature'), secret: z.string() }).nullable().optional(),
  })
  .strict();

export type AutomationRuleInput = z.input<typeof automationRuleInputSchema>;
export type AutomationRule = z.output<typeof automationRuleInputSchema> & { id: string };

export interface AutomationLogEntry {
  seq: number;
  ruleId: string;
  object: ObjectName;
  event: AutomationEvent;
  recordId: number;
  /** fired: sent; duplicate: an extra identical send; dropped: silently never sent. */
  status: 'fired' | 'duplicate' | 'dropped';
  at: string;
  /** Filled once the POST completes: the receiver's status, or the network error. */
  httpStatus?: number;
  error?: string;
  deliveredAt?: string;
}

export class Automation {
  readonly rules: AutomationRule[] = [];
  private readonly log: AutomationLogEntry[] = [];
  private readonly inflight = new Set<Promise<void>>();
  private readonly rng: Rng;
  private seq = 0;
  private ruleSeq = 0;

  constructor(
    seed: number,
    private readonly switches: () => SandboxSwitches,
    private readonly now: () => number,
  ) {
    this.rng = mulberry32(seed ^ 0xa5a5a5a5);
  }

  addRule(input: AutomationRuleInput): AutomationRule {
    const rule = { ...automationRuleInputSchema.parse(input), id: `rule-${++this.ruleSeq}` };
    this.rules.push(rule);
    return rule;
  }

  removeRule(id: string): boolean {
    const i = this.rules.findIndex((r) => r.id === id);
    if (i < 0) return false;
    this.rules.splice(i, 1);
    return true;
  }

  entries(since = 0): AutomationLogEntry[] {
    return this.log.filter((e) => e.seq > since);
  }

  clearLog(): void {
    this.log.length = 0;
  }

  /** Resolves when every scheduled POST has completed (delays included). */
  async idle(): Promise<void> {
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight]);
  }

  /** `record` is rendered once, before a delete removes it from the store. */
  trigger(object: ObjectName, event: AutomationEvent, recordId: number, record: Record<string, unknown>): void {
    const sw = this.switches();
    for (const rule of this.rules) {
      if (rule.object !== object || !rule.events.includes(event)) continue;
      const dropRate = rule.dropRate ?? sw.automationDropRate;
      const duplicateRate = rule.duplicateRate ?? sw.automationDuplicateRate;
      const delayMs = rule.delayMs ?? sw.automationDelayMs;
      const base = { ruleId: rule.id, object, event, recordId };
      if (this.rng() < dropRate) {
        this.append({ ...base, status: 'dropped' });
        continue;
      }
      const body = JSON.stringify({
        data: rule.payload === 'record' ? record : { id: recordId },
        meta: { event, object, rule_id: rule.id, fired_at: new Date(this.now()).toISOString() },
      });
      this.send(rule, this.append({ ...base, status: 'fired' }), body, delayMs);
      if (this.rng() < duplicateRate) this.send(rule, this.append({ ...base, status: 'duplicate' }), body, delayMs);
    }
  }

  private append(e: Omit<AutomationLogEntry, 'seq' | 'at'>): AutomationLogEntry {
    const entry = { seq: ++this.seq, at: new Date(this.now()).toISOString(), ...e };
    this.log.push(entry);
    return entry;
  }

  private send(rule: AutomationRule, entry: AutomationLogEntry, body: string, delayMs: number): void {
    const headers: Record<string, string> = { 'content-type': 'application/json', 'user-agent': 'sandbox-crm-automation/1' };
    if (rule.auth?.type === 'bearer') headers.authorization = `Bearer ${rule.auth.value}`;
    else if (rule.auth?.type === 'header' && rule.auth.name) headers[rule.auth.name.toLowerCase()] = rule.auth.value;
    // rule.hmacScaffold is deliberately not used here: the live product never signs these.
    const run = async (): Promise<void> => {
      if (delayMs > 0) await new Promise((r) => setTimeout(r, delayMs));
      try {
        const res = await fetch(rule.url, { method: 'POST', headers, body, signal: AbortSignal.timeout(10_000) });
        entry.httpStatus = res.status;
        await res.arrayBuffer().catch(() => undefined);
      } catch (err) {
        entry.error = err instanceof Error ? err.message : String(err);
      }
      entry.deliveredAt = new Date(this.now()).toISOString();
    };
    const p = run().finally(() => this.inflight.delete(p));
    this.inflight.add(p);
  }
}
