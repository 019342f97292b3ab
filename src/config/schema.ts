import { isIP } from 'node:net';
import { z } from 'zod';

/**
 * One schema for everything crm-bridge reads at start: the environment and the connections
 * file. The types used across the code are inferred from it, so they cannot drift.
 */

const DURATION_UNITS = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;

/**
 * A duration as milliseconds; accepts `90s`, `5m`, `1d`, `250ms`, or a bare number of seconds,
 * also as text (`"300"`): what an environment variable or a `${VAR}` reference always gives.
 */
export const duration = z.union([z.number().nonnegative(), z.string()]).transform((value, ctx) => {
  if (typeof value === 'number') return value * 1000;
  const match = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$/.exec(value.trim());
  if (!match) {
    ctx.addIssue({ code: 'custom', message: `"${value}" is not a duration (use e.g. 90s, 5m, 1h, 1d)` });
    return z.NEVER;
  }
  return Number(match[1]) * DURATION_UNITS[(match[2] ?? 's') as keyof typeof DURATION_UNITS];
});

/** The longest wait a Node timer can hold (about 24.8 days); a longer one fires after 1 ms. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * A duration the bridge waits with a timer (an interval, a timeout, a backoff, a lease it
 * renews): longer than a timer can hold, it would fire at once and the loop would spin.
 */
const waited = duration.refine((ms) => ms <= MAX_TIMER_MS, 'must be at most 24 days (a wait that long is kept by a timer)');

/**
 * A wait that must not be 0: a loop with no pause (a poll, a claim) runs without end against the
 * CRM or the database, and a request with no time never gets an answer. `why` says what 0 does.
 */
const nonzeroWait = (why: string) => waited.refine((ms) => ms > 0, `must be more than 0: ${why}`);

const logLevel = z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']);

/** An address, a CIDR, or one of proxy-addr's names for the private ranges. */
function isProxyAddress(value: string): boolean {
  if (['loopback', 'linklocal', 'uniquelocal'].includes(value)) return true;
  const [address = '', prefix, ...rest] = value.split('/');
  const family = isIP(address);
  if (family === 0 || rest.length > 0) return false;
  return prefix === undefined || (/^\d{1,3}$/.test(prefix) && Number(prefix) <= (family === 4 ? 32 : 128));
}

/**
 * A credential presented as `Authorization: Bearer <token>`, which carries one token without
 * whitespace (RFC 6750): one with a space could never match, and every request would get a 401.
 * Trimmed first, like hook secrets, for a value read with its trailing newline.
 */
function bearerCredential(what: string) {
  return z
    .string()
    .trim()
    .min(16, `${what}must be at least 16 characters`)
    .regex(/^\S+$/, `${what}must not contain spaces or other whitespace: it is sent as Authorization: Bearer <token>`);
}

/**
 * A URL postgres.js reads as it was meant: the user, password and hosts end at the first `/` or
 * `?`, and a `#` starts a fragment. A password with one of them (or a stray `%`) unencoded
 * (`openssl rand -base64` makes `/`) names a port that is not one, another host, or no URL at
 * all; postgres.js then fails with `Invalid URL`, `URI malformed` or `getaddrinfo ENOTFOUND` and
 * a piece of the password, and names no variable.
 */
function isDatabaseUrl(value: string): boolean {
  const authority = /^postgres(?:ql)?:\/\/([^/?#]*)/.exec(value)?.[1];
  if (authority === undefined || value.includes('#')) return false;
  try {
    decodeURIComponent(authority);
    // Several hosts (`h1:5432,h2:5432`) are postgres.js's own; the URL parser checks the first.
    new URL(value.replace(authority, authority.replace(/,.*$/, '')));
    return true;
  } catch {
    return false;
  }
}

export const envSchema = z.object({
  DATABASE_URL: z
    .string()
    .refine(isDatabaseUrl, 'must be a postgres:// or postgresql:// URL, with any / ? # % @ in the password percent-encoded (%2F %3F %23 %25 %40)')
    .optional(),
  DATA_DIR: z.string().min(1).default('.data'),
  PORT: z.coerce.number().int().min(0).max(65535).default(3000),
  HOST: z.string().min(1).default('127.0.0.1'),
  LOG_LEVEL: logLevel.default('info'),
  /** `pretty` for people at a terminal, `json` for log shippers; default: pretty on a TTY. */
  LOG_FORMAT: z.enum(['json', 'pretty']).optional(),
  CRM_BRIDGE_CONFIG: z.string().min(1).optional(),
  TOKEN_ENCRYPTION_KEY: z
    .string()
    .refine((v) => Buffer.from(v, 'base64').length === 32, 'must be 32 bytes, base64-encoded')
    .optional(),
  ADMIN_TOKEN: bearerCredential('').optional(),
  /** Set: GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>`; unset: /metrics is open (it carries no client data). */
  METRICS_TOKEN: bearerCredential('').optional(),
  INSTANCE_ID: z.string().min(1).optional(),
  /**
   * Days a change's raw and mapped bodies are kept (ledger_bodies); the daily retention job
   * drops older ones unless their delivery is pending or dead. Keys, versions and hashes stay.
   */
  RETENTION_DAYS: z.coerce.number().int().min(1).max(36_500).default(30),
  /**
   * Failed authentications (401s on hooks and operator routes, refused OAuth callbacks) one
   * address may make per AUTH_FAILURE_WINDOW; its next request gets 429. 0 turns the limit off.
   * Successful requests are never counted, so a CRM's burst of good hooks is never slowed.
   */
  AUTH_FAILURE_LIMIT: z.coerce.number().int().min(0).default(20),
  AUTH_FAILURE_WINDOW: waited.default(600_000),
  /**
   * The load balancer or proxy in front: its addresses or CIDRs, comma-separated (`loopback`,
   * `linklocal`, `uniquelocal` name the private ranges), or `true` to trust any. Then a caller's
   * address (the auth-failure limit's key, the logs) is taken from X-Forwarded-For; unset, that
   * header is ignored, so no caller can choose its address.
   */
  TRUST_PROXY: z
    .string()
    .trim()
    .refine(
      (v) => v === 'true' || v.split(',').every((part) => isProxyAddress(part.trim())),
      'must be true, or addresses or CIDRs separated by commas (e.g. 10.0.0.0/8,loopback)',
    )
    .transform((v): true | string => (v === 'true' ? true : v))
    .optional(),
});
export type Env = z.infer<typeof envSchema>;

/** A dotted path into a JSON record (`practice_area.name`, `data.id`). */
const jsonPath = z.string().regex(/^[^.\s]+(\.[^.\s]+)*$/, 'must be a dotted path such as practice_area.name');

/** An HTTP request as data. Strings may hold `{{placeholders}}` (see docs/connectors.md). */
const requestTemplateSchema = z
  .object({
    method: z.enum(['GET', 'POST', 'PUT', 'PATCH', 'DELETE']).default('GET'),
    /** Relative to the base URL (`/api/v4/matters.json`) or absolute. */
    path: z.string().min(1),
    /** A value that is exactly one placeholder without a value (`{{cursor}}` on page one) drops the parameter. */
    query: z.record(z.string(), z.union([z.string(), z.number(), z.boolean()])).default({}),
    /** A JSON body template; a key whose value is exactly an unset placeholder is dropped. */
    body: z.json().optional(),
    headers: z.record(z.string(), z.string()).default({}),
  })
  .strict();
export type RequestTemplate = z.infer<typeof requestTemplateSchema>;

/** How timestamps are written into a request: the CRM's `updated_since` dialect. */
export const timeFormatSchema = z.enum(['iso8601', 'iso8601-seconds', 'epoch-ms', 'epoch-seconds']);
export type TimeFormat = z.infer<typeof timeFormatSchema>;

/** How a list call moves to its next page. The page's records are at `list.records` in every style. */
const paginationSchema = z.discriminatedUnion('style', [
  /** The response names the next page's full URL (Clio `meta.paging.next`, JSON:API `links.next`). */
  z.object({ style: z.literal('nextUrl'), nextUrlPath: jsonPath }).strict(),
  /** An opaque token from the response goes back as `{{cursor}}` (HubSpot `paging.next.after`). */
  z.object({ style: z.literal('cursor'), cursorPath: jsonPath }).strict(),
  /** `{{page}}` counts from `firstPage`; stops on a short page or at `totalPagesPath`. */
  z.object({ style: z.literal('page'), firstPage: z.number().int().min(0).default(1), totalPagesPath: jsonPath.optional() }).strict(),
  /** `{{offset}}` advances by the records received; stops on a short page or at `totalPath`. */
  z.object({ style: z.literal('offset'), totalPath: jsonPath.optional() }).strict(),
  z.object({ style: z.literal('none') }).strict(),
]);
export type Pagination = z.infer<typeof paginationSchema>;

const listCallSchema = z
  .object({
    request: requestTemplateSchema,
    /** Page size, available as `{{limit}}`. */
    limit: z.number().int().positive().default(100),
    /** Where the page's records are in the response; omitted: the response is the array. */
    records: jsonPath.optional(),
    /** Where the response says how many records match the query (progress and ETA of a backfill). */
    totalPath: jsonPath.optional(),
    pagination: paginationSchema,
    /** `{{since}}`: the changed-since bound, in the CRM's time format. */
    since: z
      .object({
        format: timeFormatSchema.default('iso8601'),
        /** Used when listing everything (the sweep) and the request cannot omit the filter. */
        whenListingAll: z.string().optional(),
      })
      .strict()
      .default({ format: 'iso8601' }),
    /**
     * What the pages are ordered by: `updatedAt` lets the poller checkpoint per page; `id`
     * (Clio cursor paging) means the cursor may only advance when the whole run completes.
     */
    order: z.enum(['updatedAt', 'id', 'none']).default('none'),
    /**
     * A CRM that refuses to page past N results in one query (HubSpot search: 10,000). Before
     * the cap, the query starts again from `request` with `{{anchor.updatedAt}}` and
     * `{{anchor.id}}` set from the last record read, so the pages continue where they stopped.
     */
    restart: z.object({ afterRecords: z.number().int().positive(), request: requestTemplateSchema }).strict().optional(),
  })
  .strict();
export type ListCall = z.infer<typeof listCallSchema>;

/** A get, create or update call: the request and where the record is in its answer. */
const recordCallSchema = z
  .object({
    request: requestTemplateSchema,
    /** Where the record is in the response (`data`); omitted: the response is the record. */
    record: jsonPath.optional(),
    /** Create/update: where the record goes in the request body (`data` → `{"data": {...}}`). */
    bodyPath: jsonPath.optional(),
  })
  .strict();
export type RecordCall = z.infer<typeof recordCallSchema>;

/** What a mapped field is expected to hold; `scalar` is string, number, boolean or null. */
export const fieldTypeSchema = z.enum(['string', 'number', 'boolean', 'scalar', 'object', 'array', 'any']);
export type FieldType = z.infer<typeof fieldTypeSchema>;

/**
 * How one CRM object maps into crm-bridge, and the calls that read and write it. Only the id,
 * version and field map are needed by the gate; a connector fed by hooks alone can omit the calls.
 */
export const objectDefinitionSchema = z
  .object({
    idPath: jsonPath.default('id'),
    /** The CRM's own modification time; orders changes and drives the poll cursor. */
    updatedAtPath: jsonPath.optional(),
    /** A version for dedup (`updated_at`, a revision number); defaults to updatedAtPath. */
    versionPath: jsonPath.optional(),
    /** Canonical field name → dotted path in the raw record. Omitted: the whole record. */
    fields: z.record(z.string(), jsonPath).optional(),
    /**
     * Canonical field name → the type the field map expects (default `scalar`); checked by
     * `probe`. A `string` field is one the CRM keeps as text: a number or boolean the pipeline
     * writes to it is sent as its text, which is what the CRM reads back (HubSpot: "5550100"
     * for 5550100), so the write's echo and the record it made are recognised.
     */
    fieldTypes: z.record(z.string(), fieldTypeSchema).optional(),
    /**
     * For a CRM with no null to write (HubSpot keeps every property as text): a mapped field the
     * pipeline writes null is sent as this value, the only one that clears it there (HubSpot
     * answers a null 200 and keeps the value), and this value read back maps to null, so a
     * cleared field is delivered, hashed and matched with the write's echo as the null written.
     */
    nullAs: z.string().optional(),
    /** Canonical fields that are read but never written back (computed or relation names). */
    readOnly: z.array(z.string()).optional(),
    /**
     * Canonical field → how it is written when that differs from where it is read: a JSON object
     * merged into the record written, `{{value}}` standing for the field's value (a lone
     * `{{value}}` keeps its type). Clio reads a contact's email at `primary_email_address` and
     * takes it only as `email_addresses: [{name, address, default_email}]`.
     */
    writeAs: z.record(z.string(), z.json()).optional(),
    /**
     * Canonical field names (keys of `fields`; top-level keys without a field map) holding client
     * data: names, emails, phones, what happened. Redacted in every debug log of a record.
     */
    sensitive: z.array(z.string()).optional(),
    /** Top-level keys that change without a real change (etags, counters); excluded from hashes. */
    volatile: z.array(z.string()).default([]),
    list: listCallSchema.optional(),
    get: recordCallSchema.optional(),
    create: recordCallSchema.optional(),
    update: recordCallSchema.optional(),
    /** Record paths whose string values are lowercased on write (Clio reads `Open`, accepts only `open`). */
    lowercaseOnWrite: z.array(jsonPath).optional(),
    /**
     * Where the bridge stamps the records it writes, for a CRM with a field for it: `value` may
     * use `{{writeId}}`; a record whose value at `path` starts with the part before the first
     * placeholder came from the bridge. `stampOn`: `create` (the default) stamps only the
     * records the bridge creates, so an update never overwrites what the firm keeps in a shared
     * field (Clio's `client_reference`); `write` stamps every write, for a field of the bridge's
     * own (a custom property).
     */
    originMarker: z.object({ path: jsonPath, value: z.string().min(1), stampOn: z.enum(['create', 'write']).default('create') }).strict().optional(),
  })
  .strict()
  .superRefine((def, ctx) => {
    for (const [name, template] of Object.entries(def.writeAs ?? {})) {
      const problem = writeAsProblem(def, name, template);
      if (problem !== undefined) ctx.addIssue({ code: 'custom', path: ['writeAs', name], message: problem });
    }
  });
export type ObjectDefinition = z.infer<typeof objectDefinitionSchema>;

/** Why a `writeAs` entry could never write its field, or undefined when it can. */
function writeAsProblem(def: { fields?: Record<string, string> | undefined; readOnly?: string[] | undefined }, name: string, template: unknown): string | undefined {
  if (def.fields === undefined) return 'writeAs needs a field map (fields): it says how a mapped field is written';
  if (!Object.hasOwn(def.fields, name)) return `"${name}" is not a field of this object (its fields: ${Object.keys(def.fields).join(', ')})`;
  if (def.readOnly?.includes(name)) return `"${name}" is also listed in readOnly, and a read-only field is never written`;
  if (template === null || typeof template !== 'object' || Array.isArray(template) || Object.keys(template).length === 0) {
    return 'must be an object merged into the record written, e.g. { email_addresses: [{ address: "{{value}}" }] }';
  }
  const placeholders = new Set(templateStrings(template).flatMap((text) => [...text.matchAll(/\{\{\s*([\w.]+)\s*\}\}/g)].map((m) => m[1])));
  const others = [...placeholders].filter((p) => p !== 'value');
  if (others.length > 0) return `a writeAs template has only {{value}}, not ${others.map((p) => `{{${p}}}`).join(', ')}`;
  if (!placeholders.has('value')) return "must use {{value}} where the field's value goes";
  return undefined;
}

/** The string values of a JSON template, where its placeholders are (keys are not rendered). */
function templateStrings(value: unknown): string[] {
  if (typeof value === 'string') return [value];
  if (value !== null && typeof value === 'object') return Object.values(value).flatMap(templateStrings);
  return [];
}

/** How the CRM says it is rate limiting, for pacing and 429 handling in the HTTP client. */
const rateLimitSchema = z
  .object({
    /** The unit of `Retry-After` on a 429: seconds by RFC 9110, milliseconds at HubSpot. */
    retryAfterUnit: z.enum(['seconds', 'milliseconds']).default('seconds'),
    /** A floor between requests, for a limit the CRM does not announce in headers (HubSpot search: 4/s). */
    minIntervalMs: z.number().int().min(0).default(0),
  })
  .strict();

export const connectorDefinitionSchema = z
  .object({
    /** The API's base URL; a connection's `baseUrl` overrides it (region, sandbox). */
    baseUrl: z.url({ protocol: /^https?$/ }).optional(),
    /** Other hosts that serve the same API (regions); `probe` tries them when the base URL fails. */
    regionalHosts: z.array(z.url({ protocol: /^https?$/ })).default([]),
    rateLimit: rateLimitSchema.default({ retryAfterUnit: 'seconds', minIntervalMs: 0 }),
    objects: z.record(z.string().regex(/^[a-z][a-z0-9_]*$/, 'object names are lowercase identifiers'), objectDefinitionSchema)
      .refine((o) => Object.keys(o).length > 0, 'a connector needs at least one object'),
  })
  .strict();
export type ConnectorDefinition = z.infer<typeof connectorDefinitionSchema>;

/**
 * Secrets are compared with what a request's header carries, and HTTP trims header values: a
 * secret read from a file with its trailing newline (a Kubernetes secret, a .env line) is taken
 * without it, or no request could ever match it. The same holds for the credentials the bridge
 * sends (`credential`): a header value ending in a newline is refused by undici, and a client
 * secret with one by the CRM's token endpoint.
 */
const secret = z.string().trim().min(16, 'a hook secret must be at least 16 characters');
const credential = z.string().trim().min(1);

export const inboundSchema = z
  .object({
    /** Every secret listed is accepted, so a new one can be rolled out before the old goes. */
    secrets: z.array(secret).min(1, 'at least one hook secret is required'),
    /** Header carrying the secret as-is; without it, `Authorization: Bearer <secret>`. */
    header: z
      .string()
      .regex(/^[A-Za-z0-9-]+$/, 'must be an HTTP header name')
      .transform((h) => h.toLowerCase())
      .optional(),
    payload: z.enum(['record', 'notification']).default('record'),
    /** Where the record sits in the body (`data`); omitted: the body is the record. */
    recordPath: jsonPath.optional(),
    /** The object a hook carries when the URL has no `?object=`; defaults to the first object. */
    object: z.string().optional(),
    /**
     * How a hook says the record was deleted (Clio hard-deletes; its webhooks and most automation
     * middleware send the event beside the record: `{path: "meta.event", equals: ["deleted"]}`).
     * A matching hook is a delete of the record it names; without it, a deleted event reads as
     * the record's last version again, and the delete waits for the sweep.
     */
    deleteWhen: z.object({ path: jsonPath, equals: z.array(z.string().min(1)).min(1) }).strict().optional(),
    bodyLimit: z.number().int().positive().max(64 * 1024 * 1024).default(1024 * 1024),
  })
  .strict()
  // Sent as a Bearer token (no `header`), a secret with whitespace could never match: every hook 401.
  .refine((i) => i.header !== undefined || i.secrets.every((s) => /^\S+$/.test(s)), {
    path: ['secrets'],
    message: 'a hook secret sent as Authorization: Bearer <secret> must not contain spaces or other whitespace (or set inbound.header to send it as-is)',
  });

/** Headers the bridge sets itself on every delivery; configuring them would break dedup or parsing. */
const RESERVED_DOWNSTREAM_HEADERS = ['idempotency-key', 'content-type', 'content-length', 'host'];

/**
 * Where and how changes go to the intake pipeline (DESIGN "Delivery"). Header values may hold
 * the pipeline's API key through `${ENV}` references; they are sent, never logged. Durations
 * parse to milliseconds; zod 4 defaults skip the transform, so defaults are written in ms.
 */
export const downstreamSchema = z
  .object({
    url: z.url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' }),
    headers: z
      .record(z.string().regex(/^[A-Za-z0-9-]+$/, 'must be an HTTP header name'), z.string().trim())
      .refine((h) => Object.keys(h).every((name) => !RESERVED_DOWNSTREAM_HEADERS.includes(name.toLowerCase())), {
        message: `${RESERVED_DOWNSTREAM_HEADERS.join(', ')} are set by the bridge itself`,
      })
      .default({}),
    /** Per request; a request still open after this counts as a failed, retryable attempt. */
    timeout: nonzeroWait('every delivery would be cut off before the pipeline could answer').default(10_000),
    /** Deliveries in flight at once per worker (each replica runs one worker per connection). */
    concurrency: z.number().int().min(1).max(64).default(4),
    /** Attempts before a retryable failure becomes a dead letter. */
    maxAttempts: z.number().int().min(1).default(15),
    /** Age (since queued) after which a retryable failure becomes a dead letter. */
    maxAge: duration.default(86_400_000),
    /** Exponential backoff: base × 2^(attempt-1), capped, with jitter; Retry-After wins when longer. */
    backoff: z.object({ base: waited.default(1_000), max: waited.default(600_000) }).strict().default({ base: 1_000, max: 600_000 }),
    /** A pending change older than this marks the connection degraded in /health (503). */
    degradedAfter: duration.default(900_000),
    /** How long a claimed row stays leased to its worker; must outlast one request. Default: timeout + 10s. */
    lease: waited.optional(),
    /** Pause between claims when the outbox has nothing due. */
    pollInterval: nonzeroWait('an idle worker would query the outbox without pause').default(1_000),
  })
  .strict()
  .refine((d) => d.lease === undefined || d.lease > d.timeout, { path: ['lease'], message: 'must be longer than timeout, or a live delivery could be claimed twice' })
  .refine((d) => d.backoff.max >= d.backoff.base, { path: ['backoff', 'max'], message: 'must be at least backoff.base' });
export type DownstreamConfig = z.infer<typeof downstreamSchema>;

/**
 * The reconciling poller and sweep (DESIGN "Poller and sweep"). Durations parse to ms; zod 4
 * defaults skip the transform, so defaults are written in ms.
 */
export const pollSchema = z
  .object({
    /** Objects to poll; default: every object whose connector defines a list call. */
    objects: z.array(z.string()).optional(),
    interval: nonzeroWait('the poller would call the CRM without pause, and /health would stay 503 (stale); leave out poll for a connection fed by hooks only').default(300_000),
    /** Random extra pause, as a fraction of the interval, so replicas and streams spread out. */
    jitter: z.number().min(0).max(1).default(0.2),
    /** Each run re-reads this far behind its cursor: clock skew, inclusive/exclusive doubt, ties. */
    lookback: duration.default(120_000),
    /** A stream with no successful run for this long is stale (/health 503). Default: three intervals. */
    staleAfter: duration.optional(),
    /** Full id listing that finds deletes and anything the changed-since filter missed; 0 turns it off. */
    sweepInterval: duration.default(86_400_000),
    /**
     * The most deletes a sweep makes by itself, as a fraction of the stream's records (never
     * fewer than 10): a listing that suddenly lacks more (a token that sees less, a CRM that
     * answers short) is held for an operator, `crm-bridge sweep <connection> --allow-deletes`.
     * 1 lets any number through.
     */
    sweepDeleteLimit: z.number().min(0).max(1).default(0.1),
    /** Records per page (the connector's limit when unset). */
    pageSize: z.number().int().positive().optional(),
    /** How long a replica holds a stream; another takes over after this when the holder dies. */
    lease: nonzeroWait('a replica would lose a stream as soon as it took it').optional(),
    /** Where a stream with no cursor starts (ISO-8601); default: everything. */
    initialSince: z.iso.datetime({ offset: true }).optional(),
  })
  .strict();
export type PollConfig = z.infer<typeof pollSchema>;

/** An absolute http(s) URL, or a path (`/oauth/token`) resolved against the connection's baseUrl. */
const endpointUrl = z
  .string()
  .refine((v) => v.startsWith('/') || /^https?:\/\/[^/]/.test(v), 'must be an absolute http(s) URL or a path starting with /');

const oauthClientFields = {
  /** `${ENV}` references keep client secrets out of the file; they are sent, never logged. */
  clientId: credential,
  clientSecret: credential,
  tokenUrl: endpointUrl,
  scopes: z.array(z.string().min(1)).default([]),
  /** RFC 6749 §2.3.1 allows both; HubSpot accepts only `body`. */
  clientAuth: z.enum(['body', 'basic']).default('body'),
  /** Refresh this long before the claimed expiry (capped at half the claimed lifetime). */
  refreshMarginSeconds: z.number().int().nonnegative().default(300),
};

/**
 * How the bridge authenticates to the CRM (DESIGN "OAuth2 token manager"). `oauth2` is the
 * authorization-code grant kept alive with refresh tokens; `static` is a vendor "API key",
 * which may really be an OAuth token that expires: a 401 then means re-authorise, not retry.
 */
export const authSchema = z.discriminatedUnion('type', [
  z
    .object({
      type: z.literal('oauth2'),
      ...oauthClientFields,
      authorizeUrl: endpointUrl,
      /** Where the CRM sends the browser back; default: this bridge's /oauth/<id>/callback as requested. */
      redirectUri: z.url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' }).optional(),
    })
    .strict(),
  z.object({ type: z.literal('client_credentials'), ...oauthClientFields }).strict(),
  z.object({ type: z.literal('static'), token: credential }).strict(),
  z.object({ type: z.literal('none') }).strict(),
]);
export type AuthConfig = z.infer<typeof authSchema>;

/**
 * The pipeline's writes into the CRM (DESIGN "Outbound and the loop guard"). API keys are
 * `${ENV}` references; every key listed is accepted, so a new one can roll out before the old
 * goes. Durations parse to ms; zod 4 defaults skip the transform, so defaults are written in ms.
 */
export const outboundSchema = z
  .object({
    apiKeys: z.array(bearerCredential('a pipeline API key ')).min(1, 'at least one pipeline API key is required'),
    /** CRM calls in flight at once per writer (each replica runs one writer per connection). */
    concurrency: z.number().int().min(1).max(32).default(4),
    /** Attempts before a retryable CRM failure (5xx, 408, 429, network) marks the write failed. */
    maxAttempts: z.number().int().min(1).default(10),
    /** Exponential backoff between attempts: base × 2^(attempt-1), capped, with jitter. */
    backoff: z.object({ base: waited.default(1_000), max: waited.default(300_000) }).strict().default({ base: 1_000, max: 300_000 }),
    /** How long a claimed write stays leased to its writer; must outlast one CRM call with its retries. */
    lease: nonzeroWait('a write would be claimable again while its CRM call is under way').default(120_000),
    /** Pause between claims when nothing is due. */
    pollInterval: nonzeroWait('an idle writer would query the writes without pause').default(1_000),
  })
  .strict()
  .refine((o) => o.backoff.max >= o.backoff.base, { path: ['backoff', 'max'], message: 'must be at least backoff.base' });
export type OutboundConfig = z.infer<typeof outboundSchema>;

export const connectionSchema = z
  .object({
    id: z.string().regex(/^[a-z0-9][a-z0-9_-]{0,62}$/, 'must be lowercase letters, digits, - or _ (at most 63)'),
    connector: connectorDefinitionSchema,
    /** Overrides the connector's base URL (another region, the sandbox). */
    baseUrl: z.url({ protocol: /^https?$/ }).optional(),
    inbound: inboundSchema,
    /** Deliver a newer version whose mapped content is unchanged (DESIGN rule 4, configurable). */
    deliverUnchanged: z.boolean().default(false),
    /** The intake pipeline; without it, changes are recorded and queued but not delivered. */
    downstream: downstreamSchema.optional(),
    auth: authSchema.default({ type: 'none' }),
    /** Without it, the connection is hooks-only. */
    poll: pollSchema.optional(),
    /** The pipeline's writes into the CRM; without it, `POST /v1/connections/:id/records` answers 401. */
    outbound: outboundSchema.optional(),
  })
  .strict();
export type ConnectionConfig = z.infer<typeof connectionSchema>;

/** The streams a connection polls: its configured objects, or every object with a list call. */
export function pollObjects(connection: Pick<ConnectionConfig, 'connector' | 'poll'>): string[] {
  if (!connection.poll) return [];
  return connection.poll.objects ?? Object.entries(connection.connector.objects).filter(([, def]) => def.list !== undefined).map(([name]) => name);
}

/**
 * Why notifications of `object` (hooks carrying only an id) would never be fetched, or undefined
 * when they are: the poller fetches them, with the object's get call.
 */
export function unfetchedNotifications(connection: Pick<ConnectionConfig, 'connector' | 'poll'>, object: string): string | undefined {
  if (connection.connector.objects[object]?.get === undefined) return `"${object}" has no get call in this connector to fetch a notified record with`;
  if (!pollObjects(connection).includes(object)) return `"${object}" is not polled (poll.objects), and notified records are fetched by its poller`;
  return undefined;
}

export const connectionsFileSchema = z
  .object({
    connections: z.array(connectionSchema).min(1, 'list at least one connection'),
  })
  .strict()
  .superRefine((file, ctx) => {
    const seen = new Set<string>();
    file.connections.forEach((c, i) => {
      if (seen.has(c.id)) ctx.addIssue({ code: 'custom', path: ['connections', i, 'id'], message: `duplicate connection id "${c.id}"` });
      seen.add(c.id);
      const objects = Object.keys(c.connector.objects);
      for (const [j, object] of (c.poll?.objects ?? []).entries()) {
        const list = c.connector.objects[object]?.list;
        if (list === undefined) {
          ctx.addIssue({
            code: 'custom',
            path: ['connections', i, 'poll', 'objects', j],
            message: `"${object}" has no list call in this connector (objects: ${objects.join(', ')})`,
          });
        }
      }
      if (c.inbound.object !== undefined && !objects.includes(c.inbound.object)) {
        ctx.addIssue({
          code: 'custom',
          path: ['connections', i, 'inbound', 'object'],
          message: `"${c.inbound.object}" is not an object of this connector (${objects.join(', ')})`,
        });
      } else if (c.inbound.payload === 'notification') {
        // The object a hook without ?object= carries; hooks naming another are refused if it cannot be fetched.
        const why = unfetchedNotifications(c, c.inbound.object ?? objects[0]!);
        if (why) ctx.addIssue({ code: 'custom', path: ['connections', i, 'inbound', 'payload'], message: `notifications carry only an id, but ${why}` });
      }
    });
  });
export type ConnectionsFile = z.infer<typeof connectionsFileSchema>;
