import type { ConnectionConfig, FieldType, ObjectDefinition } from '../config/schema.js';
import { AppError } from '../errors.js';
import { getPath } from '../sync/record.js';
import { createConnector, describeType } from './connector.js';
import type { Connector } from './connector.js';
import { CrmHttpError } from './http-client.js';
import type { CrmHttpClientOptions } from './http-client.js';
import type { TokenProvider } from './token-provider.js';

/**
 * `crm-bridge probe`: "pull one live record first". Fetches one record through the real auth
 * flow and checks it against the connector definition, because the vendors' docs are wrong about
 * the host, the token lifetime and the shape of fields (specs/README.md), and a wrong field map
 * otherwise shows up only as quietly empty fields downstream.
 */

export interface ProbeFinding {
  kind: 'missing' | 'type' | 'null' | 'unmapped';
  /** The canonical field (absent for unmapped paths). */
  field?: string;
  path: string;
  expected?: FieldType;
  found?: string;
  suggestion?: string;
  /** Missing and wrong-typed fields are mismatches; nulls and unmapped paths are information. */
  mismatch: boolean;
}

export interface HostCheck {
  url: string;
  status: 'answers' | 'rejects-token' | 'fails';
  detail?: string;
}

export interface TokenLifetime {
  /** `expires_in` as the token endpoint claimed it; null when it claimed none. */
  claimedLifetimeSeconds: number | null;
  expiresAt: Date | null;
}

export interface ProbeReport {
  connectionId: string;
  object: string;
  host: HostCheck;
  /** Known regional hosts tried because the configured one failed. */
  alternatives: HostCheck[];
  record: unknown;
  findings: ProbeFinding[];
  token: TokenLifetime | null;
  mismatch: boolean;
}

export interface ProbeOptions {
  connection: Pick<ConnectionConfig, 'id' | 'connector' | 'baseUrl'>;
  object?: string;
  tokens?: TokenProvider;
  /** What the token endpoint claimed about the token in use (the token manager's stored row). */
  tokenLifetime?: () => Promise<TokenLifetime | null>;
  http?: Partial<CrmHttpClientOptions>;
  signal?: AbortSignal;
}

/** The host failed in a way another host might not: wrong page, no answer, a region's 401, or a redirect to another host. */
const HOST_FAILURES = new Set(['CRM_NOT_JSON', 'CRM_UNREACHABLE', 'CRM_TIMEOUT', 'CRM_UNAUTHORIZED', 'CRM_OTHER_ORIGIN']);

class TokenRejected extends Error {}

export async function probeConnection(opts: ProbeOptions): Promise<ProbeReport> {
  const { connection } = opts;
  const definition = connection.connector;
  const object = opts.object ?? Object.keys(definition.objects)[0] ?? '';
  const def = definition.objects[object];
  // A mistyped --object is the operator's mistake (exit status 2, as poll and backfill answer it), not a mismatch (1).
  if (def === undefined) throw new AppError(422, 'UNKNOWN_OBJECT', `connection ${connection.id} has no object "${object}" (it has ${Object.keys(definition.objects).join(', ')})`);
  const baseUrl = connection.baseUrl ?? definition.baseUrl;
  if (baseUrl === undefined) throw new Error(`connection ${connection.id} has no baseUrl and its connector none`);

  const connector = (url: string, tokens: TokenProvider | undefined, http: Partial<CrmHttpClientOptions>): Connector =>
    createConnector({ definition, baseUrl: url, ...(tokens ? { tokens } : {}), http: { maxRetries: 1, timeoutMs: 15_000, ...opts.http, ...http } });

  const report: ProbeReport = { connectionId: connection.id, object, host: { url: baseUrl, status: 'answers' }, alternatives: [], record: null, findings: [], token: null, mismatch: false };

  let record: unknown;
  try {
    record = await firstRecord(connector(baseUrl, opts.tokens, {}), object, opts.signal);
  } catch (err) {
    if (!(err instanceof CrmHttpError) || !HOST_FAILURES.has(err.code)) throw err;
    report.host = { url: baseUrl, status: 'fails', detail: err.message };
    report.mismatch = true;
    // Another region with the same token: a 401 there is an answer too (the token's region is elsewhere).
    const noRefresh: TokenProvider | undefined = opts.tokens && {
      getAccessToken: (signal) => opts.tokens!.getAccessToken(signal),
      handleUnauthorized: async () => {
        throw new TokenRejected();
      },
    };
    for (const url of definition.regionalHosts) {
      if (sameHost(url, baseUrl)) continue;
      try {
        const found = await firstRecord(connector(url, noRefresh, { maxRetries: 0, timeoutMs: 5_000 }), object, opts.signal);
        report.alternatives.push({ url, status: 'answers' });
        record ??= found;
      } catch (altErr) {
        if (altErr instanceof TokenRejected) report.alternatives.push({ url, status: 'rejects-token', detail: 'answers, but refuses this token (another region?)' });
        else report.alternatives.push({ url, status: 'fails', detail: (altErr as Error).message });
      }
    }
  }

  report.token = (await opts.tokenLifetime?.()) ?? null;
  if (record !== undefined) {
    report.record = record;
    report.findings = checkRecord(record, def);
    if (report.findings.some((f) => f.mismatch)) report.mismatch = true;
  }
  return report;
}

async function firstRecord(connector: Connector, object: string, signal: AbortSignal | undefined): Promise<unknown> {
  for await (const page of connector.listChanges({ object, since: new Date(0), pageSize: 1, ...(signal ? { signal } : {}) })) {
    return page.records[0] ?? null;
  }
  return null;
}

function sameHost(a: string, b: string): boolean {
  return new URL(a).origin === new URL(b).origin && new URL(a).pathname.replace(/\/$/, '') === new URL(b).pathname.replace(/\/$/, '');
}

/** Each mapped path against the record: present, of the expected type; then what the map leaves out. */
export function checkRecord(record: unknown, def: ObjectDefinition): ProbeFinding[] {
  if (record === null || record === undefined) return [];
  const findings: ProbeFinding[] = [];
  const fields = def.fields ?? {};
  for (const [field, path] of Object.entries(fields)) {
    const expected = def.fieldTypes?.[field] ?? 'scalar';
    const { value, stoppedAt } = walk(record, path);
    if (stoppedAt !== undefined) {
      // A relation that is null on this record (no practice area yet) is data, not a wrong map.
      findings.push({ kind: 'null', field, path, expected, found: `null at ${stoppedAt}`, mismatch: false });
      continue;
    }
    if (value === undefined) {
      const suggestion = nearestPath(record, path);
      findings.push({ kind: 'missing', field, path, expected, found: 'nothing', ...(suggestion ? { suggestion } : {}), mismatch: true });
      continue;
    }
    if (value === null) {
      findings.push({ kind: 'null', field, path, expected, found: 'null', mismatch: false });
      continue;
    }
    if (!matchesType(value, expected)) {
      const suggestion = typeof value === 'object' ? scalarInside(value, path) : undefined;
      findings.push({ kind: 'type', field, path, expected, found: describeType(value), ...(suggestion ? { suggestion } : {}), mismatch: true });
    }
  }
  if (def.fields !== undefined) {
    const covered = [def.idPath, def.updatedAtPath, def.versionPath, ...def.volatile, ...Object.values(fields)].filter((p): p is string => p !== undefined);
    for (const path of leafPaths(record)) {
      if (covered.some((c) => path === c || path.startsWith(`${c}.`))) continue;
      findings.push({ kind: 'unmapped', path, found: describeType(getPath(record, path)), mismatch: false });
    }
  }
  return findings;
}

function matchesType(value: unknown, expected: FieldType): boolean {
  switch (expected) {
    case 'any':
      return true;
    case 'scalar':
      return typeof value !== 'object';
    case 'object':
      return typeof value === 'object' && !Array.isArray(value);
    case 'array':
      return Array.isArray(value);
    default:
      return typeof value === expected;
  }
}

/** Follows a path; reports where a null cut it short, so a null relation is told apart from a wrong path. */
function walk(record: unknown, path: string): { value: unknown; stoppedAt?: string } {
  let current: unknown = record;
  const keys = path.split('.');
  for (const [i, key] of keys.entries()) {
    if (current === null && i > 0) return { value: undefined, stoppedAt: keys.slice(0, i).join('.') };
    if (current === null || typeof current !== 'object' || !Object.hasOwn(current, key)) return { value: undefined };
    current = (current as Record<string, unknown>)[key];
  }
  return { value: current };
}

const PREFERRED_KEYS = ['name', 'display_name', 'title', 'value', 'label', 'id'];

/** For an object where a scalar was expected: `practice_area` → `practice_area.name`. */
function scalarInside(value: object, path: string): string | undefined {
  if (Array.isArray(value)) {
    const first: unknown = value[0];
    if (first !== null && typeof first === 'object') return scalarInside(first, `${path}.0`);
    return value.length > 0 ? `${path}.0` : undefined;
  }
  const entries = Object.entries(value).filter(([, v]) => v === null || typeof v !== 'object');
  const preferred = PREFERRED_KEYS.find((k) => entries.some(([key, v]) => key === k && typeof v === 'string')) ?? PREFERRED_KEYS.find((k) => entries.some(([key]) => key === k));
  const key = preferred ?? entries.find(([, v]) => typeof v === 'string')?.[0] ?? entries[0]?.[0];
  return key === undefined ? undefined : `${path}.${key}`;
}

/** A path in the record whose last segment resembles the missing one (`name` → `display_number`? no; `email` → `primary_email_address`). */
function nearestPath(record: unknown, path: string): string | undefined {
  const last = (path.split('.').at(-1) ?? '').toLowerCase().replace(/[_-]/g, '');
  if (last === '') return undefined;
  const candidates = leafPaths(record);
  return (
    candidates.find((p) => (p.split('.').at(-1) ?? '').toLowerCase().replace(/[_-]/g, '') === last) ??
    candidates.find((p) => p.toLowerCase().replace(/[_-]/g, '').includes(last))
  );
}

/** Dotted paths to every scalar (and empty container) in the record, three levels deep, arrays by their first item. */
function leafPaths(value: unknown, prefix = '', depth = 0): string[] {
  if (value === null || typeof value !== 'object' || depth > 3) return prefix ? [prefix] : [];
  const entries = Array.isArray(value) ? (value.length > 0 ? [['0', value[0]] as const] : []) : Object.entries(value);
  if (entries.length === 0) return prefix ? [prefix] : [];
  return entries.flatMap(([k, v]) => leafPaths(v, prefix ? `${prefix}.${k}` : k, depth + 1));
}

/** The report as an operator reads it: the record, then one line per finding. */
export function formatProbeReport(report: ProbeReport): string {
  const lines: string[] = [];
  lines.push(`connection ${report.connectionId}, object ${report.object}`);
  if (report.host.status === 'answers') lines.push(`host ${report.host.url}: answers`);
  else {
    lines.push(`MISMATCH host ${report.host.url} fails: ${report.host.detail ?? ''}`);
    for (const alt of report.alternatives) lines.push(`  known host ${alt.url}: ${alt.status}${alt.detail && alt.status !== 'answers' ? ` (${alt.detail})` : ''}`);
    const answering = report.alternatives.filter((a) => a.status === 'answers').map((a) => a.url);
    lines.push(answering.length > 0 ? `  set the connection's baseUrl to ${answering.join(' or ')}` : '  no known host answers with this token');
  }
  if (report.token) {
    const claimed = report.token.claimedLifetimeSeconds;
    lines.push(
      `token: the server claimed ${claimed === null ? 'no lifetime (no expires_in)' : `a lifetime of ${claimed} s (${humanSeconds(claimed)})`}` +
        `${report.token.expiresAt ? `, expires ${report.token.expiresAt.toISOString()}` : ''}; crm-bridge refreshes before that and on any 401`,
    );
  }
  if (report.record === null) {
    // Without an answer there was no list to be empty: saying so would send the operator to the CRM's data, not its address.
    const answered = report.host.status === 'answers' || report.alternatives.some((a) => a.status === 'answers');
    lines.push(answered ? 'no record to check: the list call returned none' : 'no record to check: no host answered');
  } else {
    lines.push('record:');
    lines.push(JSON.stringify(report.record, null, 2));
  }
  for (const f of report.findings) {
    if (f.kind === 'missing') lines.push(`MISMATCH ${f.field}: ${f.path} is missing${f.suggestion ? `; did you mean ${f.suggestion}?` : ''}`);
    else if (f.kind === 'type') lines.push(`MISMATCH ${f.field}: ${f.expected} expected at ${f.path}, ${f.found} found${f.suggestion ? `; use ${f.suggestion}` : ''}`);
    else if (f.kind === 'null') lines.push(`note ${f.field}: ${f.path} is ${f.found} on this record (type not checked)`);
  }
  const unmapped = report.findings.filter((f) => f.kind === 'unmapped').map((f) => f.path);
  if (unmapped.length > 0) lines.push(`present but unmapped: ${unmapped.join(', ')}`);
  lines.push(report.mismatch ? 'result: MISMATCH (see above)' : 'result: the record matches the definition');
  return `${lines.join('\n')}\n`;
}

function humanSeconds(s: number): string {
  if (s >= 86_400) return `${+(s / 86_400).toFixed(1)} days`;
  if (s >= 3_600) return `${+(s / 3_600).toFixed(1)} hours`;
  return `${+(s / 60).toFixed(1)} minutes`;
}

/**
 * The CLI: loads the config, authenticates through the token manager (its stored grant), probes,
 * prints, and returns the exit status (1 on a mismatch).
 */
export async function runProbeCommand(args: { connectionId: string; object?: string; print: (text: string) => void; env?: Record<string, string | undefined> }): Promise<number> {
  const { loadConfig } = await import('../config/load.js');
  const config = loadConfig(args.env ?? process.env);
  const connection = config.connections.find((c) => c.id === args.connectionId);
  if (connection === undefined) {
    // One line naming the file, as poll and backfill say it: the configuration itself is fine (not "cannot start").
    throw new AppError(404, 'UNKNOWN_CONNECTION', `no connection "${args.connectionId}" in ${config.source ?? 'the configuration'} (known: ${config.connections.map((c) => c.id).join(', ')})`);
  }
  if (connection.auth.type === 'none') {
    const report = await probeConnection({ connection, ...(args.object ? { object: args.object } : {}) });
    args.print(formatProbeReport(report));
    return report.mismatch ? 1 : 0;
  }
  const { join } = await import('node:path');
  const { openDatabase } = await import('../db/client.js');
  const { TokenCipher, loadTokenKey } = await import('./crypto.js');
  const { createTokenManager } = await import('./token-manager.js');
  const { getTokenRow } = await import('../db/queries/tokens.js');
  const env = config.env;
  const database = openDatabase({ url: env.DATABASE_URL, dataDir: join(env.DATA_DIR, 'pgdata'), max: 2 });
  try {
    await database.migrate();
    const cipher = new TokenCipher(loadTokenKey({ key: env.TOKEN_ENCRYPTION_KEY, driver: database.driver, dataDir: env.DATA_DIR }));
    const tokens = createTokenManager(database.db, connection, { cipher });
    const report = await probeConnection({
      connection,
      tokens,
      ...(args.object ? { object: args.object } : {}),
      tokenLifetime: async () => {
        const row = await getTokenRow(database.db, connection.id);
        return row ? { claimedLifetimeSeconds: row.claimedLifetimeSeconds, expiresAt: row.expiresAt } : null;
      },
    });
    args.print(formatProbeReport(report));
    return report.mismatch ? 1 : 0;
  } finally {
    await database.close();
  }
}
