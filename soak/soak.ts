import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import postgres from 'postgres';
import { openDatabase } from '../src/db/client.js';
import { DEFAULT_CLIENT, startSandbox, type Sandbox } from '../src/sandbox/index.js';
import { mulberry32, pick, type Rng } from '../src/sandbox/prng.js';
import { startCrmProxy, startHookRelay, type RelayedHook } from './proxies.js';

export interface SoakOptions {
  /** Base Postgres URL; the soak creates a fresh database beside it and drops it afterwards. */
  databaseUrl: string;
  changes: number;
  writes: number;
  kills: number;
  pgRestarts: number;
  /** CRM changes per second while generating. */
  rate: number;
  seed: number;
  /** Records in the CRM before the run (split between matters and contacts). */
  records: number;
  /** Poll interval and sweep interval of the bridges. */
  pollInterval: string;
  sweepInterval: string;
  /** Upper bound on the whole run; past it the soak stops and fails. */
  timeoutMs: number;
  log: (line: string) => void;
  /** Aborting stops the run early (Ctrl-C); the bridges, sink and database are still cleaned up. */
  signal?: AbortSignal;
}

export const DEFAULT_SOAK: Omit<SoakOptions, 'databaseUrl' | 'log'> = {
  changes: 100_000,
  writes: 2_000,
  kills: 5,
  pgRestarts: 1,
  rate: 150,
  seed: 7,
  records: 4_000,
  pollInterval: '3s',
  sweepInterval: '90s',
  timeoutMs: 28 * 60_000,
};

// Every lie on, as issue 8 lists them. The 2% 429s come from the CRM proxy (see proxies.ts).
const LIES = {
  automationDropRate: 0.3,
  errorRate: 0.05,
  tokenRealLifetimeSeconds: 30,
  rotateRefreshTokens: true,
  clockSkewSeconds: 90,
} as const;
const RATE_LIMITED_RATE = 0.02;

export interface SoakCheck {
  name: string;
  value: number;
  limit: string;
  ok: boolean;
}

export interface SoakResult {
  rows: Array<[string, string]>;
  checks: SoakCheck[];
  ok: boolean;
  seconds: number;
}

const repoRoot = fileURLToPath(new URL('..', import.meta.url));
const HOOK_SECRET = `soak-hook-${randomBytes(12).toString('hex')}`;
const PIPELINE_KEY = `soak-pipeline-${randomBytes(12).toString('hex')}`;
const TOKEN_KEY = randomBytes(32).toString('base64');
const ADMIN_TOKEN = randomBytes(24).toString('base64url');

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

let stopSignal: AbortSignal | undefined;

async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs: number, everyMs = 250): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await Promise.resolve().then(check).catch(() => false))) {
    if (stopSignal?.aborted) throw new Error(`soak: stopped while waiting for ${what}`);
    if (Date.now() > deadline) throw new Error(`soak: timed out waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** A `crm-bridge serve` child on a fixed port, restartable under a new instance id. */
class BridgeProcess {
  child: ChildProcess | undefined;
  exited = true;
  starts = 0;
  constructor(
    readonly name: string,
    readonly port: number,
    private readonly env: Record<string, string>,
    private readonly logDir: string,
  ) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  get instance(): string {
    return `${this.name}-${this.starts}`;
  }

  async start(): Promise<void> {
    this.starts++;
    const log = createWriteStream(join(this.logDir, `${this.instance}.log`));
    const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli.ts', 'serve'], {
      cwd: repoRoot,
      env: { ...process.env, ...this.env, PORT: String(this.port), INSTANCE_ID: this.instance },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    // Both streams into one file: neither may end it, or the other's last lines would be
    // written after its end (an error that stops the whole run). It ends once both have closed.
    child.stdout!.pipe(log, { end: false });
    child.stderr!.pipe(log, { end: false });
    child.once('close', () => log.end());
    this.child = child;
    this.exited = false;
    child.once('exit', () => {
      if (this.child === child) this.exited = true;
    });
    await until(`${this.instance} to listen`, async () => {
      if (this.exited) throw new Error(`${this.instance} exited at start; see ${this.logDir}`);
      return (await fetch(`${this.url}/health/live`)).ok;
    }, 60_000, 100);
  }

  async kill(): Promise<void> {
    const child = this.child;
    if (!child || this.exited) return;
    const gone = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await gone;
  }

  async stop(): Promise<void> {
    const child = this.child;
    if (!child || this.exited) return;
    const gone = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 12_000);
    await gone;
    clearTimeout(timer);
  }
}

/** The sink in its own process. */
async function startSinkProcess(logDir: string) {
  const port = await freePort();
  const child = spawn(process.execPath, ['--import', 'tsx', 'soak/sink.ts', String(port)], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stderr!.pipe(createWriteStream(join(logDir, 'sink.log')));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`the sink exited at start (${code})`)));
  });
  const url = `http://127.0.0.1:${port}`;
  return {
    url: `${url}/changes`,
    async summary() {
      const res = await fetch(`${url}/_summary`);
      return (await res.json()) as { requests: number; unkeyed: number; keys: Array<[string, number, string, string, string | null, string, string]> };
    },
    async stop() {
      const gone = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      await gone;
    },
  };
}

function restartPostgres(): void {
  const version = readdirSync('/etc/postgresql')[0];
  if (version === undefined) throw new Error('soak: no cluster under /etc/postgresql');
  const run = spawnSync('pg_ctlcluster', ['--skip-systemctl-redirect', version, 'main', 'restart'], { encoding: 'utf8', timeout: 60_000 });
  if (run.status !== 0) throw new Error(`soak: pg_ctlcluster restart failed (${run.status}): ${run.stderr}`);
}

/** The soak's own view of the CRM changes it made, to compute what the sink must hold. */
interface Tracker {
  deleted: Array<{ object: 'matters' | 'contacts'; id: number }>;
  made: { updates: number; creates: number; deletes: number; bulk: number };
}

/** One staff action on the CRM; returns how many changes it made. */
function staffChange(sandbox: Sandbox, rng: Rng, n: number, tracker: Tracker): number {
  const { state } = sandbox;
  const object = rng() < 0.7 ? 'matters' : 'contacts';
  const items: ReadonlyArray<{ id: number }> = object === 'matters' ? state.store.matters.items : state.store.contacts.items;
  const roll = rng();
  if (roll < 0.75 && items.length > 0) {
    const rec = pick(rng, items);
    // Every edit changes a mapped field to a new value, so no edit is `unchanged` by design.
    state.updateRecord(object, rec.id, object === 'matters' ? { description: `Staff note ${n}` } : { title: `Title ${n}` });
    tracker.made.updates++;
  } else if (roll < 0.97 || items.length < 100) {
    if (object === 'matters') state.createRecord('matters', { description: `Walk-in ${n}`, status: 'open', client: { id: pick(rng, state.store.contacts.items).id } });
    else state.createRecord('contacts', { type: 'Person', first_name: 'Soak', last_name: `Person ${n}` });
    tracker.made.creates++;
  } else {
    const rec = pick(rng, items);
    state.deleteRecord(object, rec.id);
    tracker.deleted.push({ object, id: rec.id });
    tracker.made.deletes++;
  }
  return 1;
}

export async function runSoak(options: SoakOptions): Promise<SoakResult> {
  const started = Date.now();
  const deadline = started + options.timeoutMs;
  stopSignal = options.signal;
  const { log } = options;
  const rng = mulberry32(options.seed);
  const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-soak-'));
  const cleanups: Array<() => Promise<unknown>> = [];

  const dbName = `crm_bridge_soak_${randomBytes(5).toString('hex')}`;
  const admin = postgres(options.databaseUrl, { max: 1, onnotice: () => {} });
  await admin.unsafe(`create database ${dbName}`);
  const dbUrl = new URL(options.databaseUrl);
  dbUrl.pathname = `/${dbName}`;
  const databaseUrl = dbUrl.toString();
  cleanups.push(async () => {
    await admin.unsafe(`drop database if exists ${dbName} with (force)`).catch(() => {});
    await admin.end();
  });
  const migrated = openDatabase({ url: databaseUrl, max: 1 });
  await migrated.migrate();
  await migrated.close();
  const sql = postgres(databaseUrl, { max: 2, onnotice: () => {} });
  cleanups.unshift(() => sql.end({ timeout: 2 }));

  const bridges: BridgeProcess[] = [];
  let keepLogs = true;
  try {
    const sandbox = await startSandbox({ records: options.records, seed: options.seed, autoApprove: true, switches: { ...LIES } });
    cleanups.unshift(() => sandbox.close());
    const crm = await startCrmProxy(sandbox.url, { rateLimitedRate: RATE_LIMITED_RATE, rng: mulberry32(options.seed ^ 0x429) });
    cleanups.unshift(() => crm.close());
    const sink = await startSinkProcess(dir);
    cleanups.unshift(() => sink.stop());
    const relay = await startHookRelay(() => bridges.map((b) => b.url));
    cleanups.unshift(() => relay.close());

    const config = join(dir, 'connections.json');
    writeFileSync(
      config,
      JSON.stringify({
        connections: [
          {
            id: 'firm',
            connector: 'clio',
            baseUrl: crm.url,
            auth: {
              type: 'oauth2',
              clientId: DEFAULT_CLIENT.clientId,
              clientSecret: DEFAULT_CLIENT.clientSecret,
              tokenUrl: '/oauth/token',
              authorizeUrl: '/oauth/authorize',
              refreshMarginSeconds: 10,
            },
            inbound: { secrets: ['${SOAK_HOOK_SECRET}'], recordPath: 'data', object: 'matters', deleteWhen: { path: 'meta.event', equals: ['deleted'] } },
            poll: { objects: ['matters', 'contacts'], interval: options.pollInterval, jitter: 0.2, lookback: '30s', pageSize: 200, lease: '10s', sweepInterval: options.sweepInterval },
            downstream: { url: sink.url, timeout: '5s', concurrency: 8, backoff: { base: '200ms', max: '5s' }, pollInterval: '200ms' },
            outbound: { apiKeys: ['${SOAK_PIPELINE_KEY}'], concurrency: 4, backoff: { base: '200ms', max: '5s' }, lease: '30s', pollInterval: '200ms' },
          },
        ],
      }),
    );
    const env = {
      DATABASE_URL: databaseUrl,
      CRM_BRIDGE_CONFIG: config,
      // SOAK_LOG_LEVEL=info keeps every write's and poll's story in the kept logs of a failed run.
      LOG_LEVEL: process.env.SOAK_LOG_LEVEL ?? 'warn',
      LOG_FORMAT: 'json',
      TOKEN_ENCRYPTION_KEY: TOKEN_KEY,
      ADMIN_TOKEN,
      DATA_DIR: dir,
      AUTH_FAILURE_LIMIT: '0',
      SOAK_HOOK_SECRET: HOOK_SECRET,
      SOAK_PIPELINE_KEY: PIPELINE_KEY,
    };
    for (const name of ['a', 'b']) bridges.push(new BridgeProcess(name, await freePort(), env, dir));
    await bridges[0]!.start();

    // The operator's one authorisation, through the bridge's own browser flow (auto-approved consent).
    const startRes = await fetch(`${bridges[0]!.url}/oauth/firm/start`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, redirect: 'manual' });
    const cookie = (startRes.headers.get('set-cookie') ?? '').split(';')[0]!;
    const consent = await fetch(startRes.headers.get('location')!, { redirect: 'manual' });
    const callback = await fetch(consent.headers.get('location')!, { headers: { cookie }, redirect: 'manual' });
    if (callback.status !== 200) throw new Error(`soak: the OAuth callback answered ${callback.status}: ${await callback.text()}`);
    await bridges[1]!.start();
    log(`bridges ${bridges.map((b) => b.url).join(', ')} authorised; logs in ${dir}`);

    for (const object of ['matters', 'contacts'] as const) {
      sandbox.state.addAutomationRule({
        object,
        events: ['created', 'updated', 'deleted'],
        url: `${relay.url}/hooks/firm?object=${object}`,
        auth: { type: 'bearer', value: HOOK_SECRET },
        payload: 'record',
      });
    }

    // ---- load, chaos, pipeline writes --------------------------------------------------------
    const tracker: Tracker = { deleted: [], made: { updates: 0, creates: 0, deletes: 0, bulk: 0 } };
    const chaos: string[] = [];
    let inFlightAtChaos = 0;
    const leasedDeliveries = async (owner?: string) => {
      const [row] = await sql<[{ n: number }]>`select count(*)::int as n from outbox where state = 'pending' and lease_expires_at > now() and (${owner ?? null}::text is null or lease_owner like ${`${owner ?? ''}:%`})`;
      return row.n;
    };
    const killAt = Array.from({ length: options.kills }, (_, i) => Math.floor(((i + 0.5) / options.kills) * options.changes));
    // Between kills (at 10%, 30%, ... with five), so each event is seen on its own.
    const pgRestartAt = Array.from({ length: options.pgRestarts }, (_, i) => Math.floor(((i + 0.6) / options.pgRestarts) * options.changes));
    let bridgeRestartsAfterPg = 0;
    let bridgesSurvivedPg = 0;

    const writeResults = { accepted: 0, failed: 0, attempts: 0 };
    const writeAt = (i: number) => Math.floor((i / Math.max(1, options.writes)) * options.changes);
    const writesInFlight = new Set<Promise<void>>();
    let nextWrite = 0;
    const sendWrite = async (i: number): Promise<void> => {
      const matters = sandbox.state.store.matters.items;
      const update = rng() < 0.2 && matters.length > 0;
      const body = update
        ? { object: 'matters', externalId: `pipeline-update-${i}`, crmId: String(pick(rng, matters).id), fields: { description: `Pipeline note ${i}` } }
        : { object: 'matters', externalId: `pipeline-lead-${i}`, fields: { description: `Intake lead ${i}`, status: 'Open', clientId: pick(rng, sandbox.state.store.contacts.items).id } };
      for (let attempt = 0; attempt < 200; attempt++) {
        writeResults.attempts++;
        const bridge = bridges[(i + attempt) % bridges.length]!;
        try {
          const res = await fetch(`${bridge.url}/v1/connections/firm/records`, {
            method: 'POST',
            headers: { authorization: `Bearer ${PIPELINE_KEY}`, 'content-type': 'application/json', 'idempotency-key': `soak-write-${i}` },
            body: JSON.stringify(body),
            signal: AbortSignal.timeout(10_000),
          });
          await res.arrayBuffer();
          if (res.status === 202 || res.status === 200) {
            writeResults.accepted++;
            return;
          }
          if (res.status < 500 && res.status !== 409 && res.status !== 429) {
            writeResults.failed++;
            return;
          }
        } catch {
          // A killed bridge or a restarting database: the same key again, as a pipeline would.
        }
        await sleep(250);
      }
      writeResults.failed++;
    };

    const bulkEvery = Math.max(500, Math.floor(options.changes / 20));
    const bulkSize = Math.max(20, Math.floor(bulkEvery / 20));
    let made = 0;
    let sinceBulk = 0;
    let killIndex = 0;
    let pgIndex = 0;
    const genStart = Date.now();
    let lastReport = Date.now();
    while (made < options.changes) {
      if (Date.now() > deadline) throw new Error('soak: out of time while generating changes');
      if (options.signal?.aborted) throw new Error('soak: stopped');
      // Pace to the rate: catch up with the wall clock, in small bursts.
      const due = Math.min(options.changes, Math.floor(((Date.now() - genStart) / 1000) * options.rate) + 1);
      while (made < due) {
        if (sinceBulk >= bulkEvery) {
          // A spreadsheet import: records on one timestamp, no automation.
          const count = Math.min(bulkSize, options.changes - made);
          sandbox.state.bulkImport({ object: tracker.made.bulk % 2 === 0 ? 'matters' : 'contacts', count });
          tracker.made.bulk += count;
          made += count;
          sinceBulk = 0;
        } else {
          made += staffChange(sandbox, rng, made, tracker);
          sinceBulk++;
        }
      }
      while (nextWrite < options.writes && writeAt(nextWrite) <= made && writesInFlight.size < 16) {
        const p = sendWrite(nextWrite++).finally(() => writesInFlight.delete(p));
        writesInFlight.add(p);
      }
      if (killIndex < killAt.length && made >= killAt[killIndex]!) {
        const victim = bridges[killIndex % bridges.length]!;
        await victim.kill();
        // Counted once it is dead: every row it still leased, pending, is one it may have sent
        // and can no longer mark (counted before the kill, a row claimed and sent in between
        // was missed).
        const inFlight = await leasedDeliveries(victim.instance).catch(() => 0);
        inFlightAtChaos += inFlight;
        chaos.push(`kill ${victim.instance} at change ${made}, ${new Date().toISOString().slice(11, 23)} (${inFlight} deliveries in flight)`);
        log(chaos.at(-1)!);
        killIndex++;
        void (async () => {
          await sleep(1_000);
          await victim.start();
        })().catch((err: unknown) => log(`restart of ${victim.name} failed: ${(err as Error).message}`));
      }
      if (pgIndex < pgRestartAt.length && made >= pgRestartAt[pgIndex]!) {
        const inFlight = await leasedDeliveries().catch(() => 0);
        inFlightAtChaos += inFlight;
        const t0 = Date.now();
        restartPostgres();
        await until('Postgres to accept connections again', async () => (await sql`select 1`).length === 1, 60_000);
        chaos.push(`Postgres restarted at change ${made} in ${Date.now() - t0} ms (${inFlight} deliveries in flight)`);
        log(chaos.at(-1)!);
        pgIndex++;
        await sleep(5_000);
        for (const bridge of bridges) {
          if (bridge.exited) {
            bridgeRestartsAfterPg++;
            log(`${bridge.instance} exited after the Postgres restart; restarting it`);
            await bridge.start();
          } else bridgesSurvivedPg++;
        }
      }
      if (Date.now() - lastReport > 30_000) {
        lastReport = Date.now();
        const [backlog] = await sql<[{ pending: number; delivered: number }]>`select count(*) filter (where state = 'pending')::int as pending, count(*) filter (where state = 'delivered')::int as delivered from outbox`.catch(() => [{ pending: -1, delivered: -1 }] as [{ pending: number; delivered: number }]);
        log(`${made} changes, ${nextWrite} writes sent, ${relay.hooks.length} hooks relayed, outbox ${backlog.delivered} delivered / ${backlog.pending} pending, ${Math.round((Date.now() - started) / 1000)} s`);
      }
      await sleep(20);
    }
    while (nextWrite < options.writes) {
      while (nextWrite < options.writes && writesInFlight.size < 16) {
        const p = sendWrite(nextWrite++).finally(() => writesInFlight.delete(p));
        writesInFlight.add(p);
      }
      await Promise.race(writesInFlight);
    }
    await Promise.all(writesInFlight);
    // A restart still in progress must finish before quiescence is judged.
    await until('every bridge running', () => bridges.every((b) => !b.exited), 60_000);
    log(`generated ${made} changes and ${options.writes} writes in ${Math.round((Date.now() - genStart) / 1000)} s; waiting for quiescence`);

    // ---- quiescence ----------------------------------------------------------------------------
    const remaining = () => Math.max(10_000, deadline - Date.now());
    await until('the outbound writes to settle', async () => {
      const [row] = await sql<[{ n: number }]>`select count(*)::int as n from outbound_writes where state = 'pending'`;
      return row.n === 0;
    }, remaining(), 500);
    await sandbox.state.automationIdle();
    const quietSince = new Date();
    await until('a poll and a sweep of every stream after the automation went idle', async () => {
      const rows = await sql<Array<{ last_success_at: Date | null; last_sweep_at: Date | null }>>`select last_success_at, last_sweep_at from stream_cursors where connection_id = 'firm'`;
      return rows.length === 2 && rows.every((r) => r.last_success_at !== null && r.last_sweep_at !== null && r.last_success_at > quietSince && r.last_sweep_at > quietSince);
    }, remaining(), 1_000);
    await until('the outbox to drain', async () => {
      const [row] = await sql<[{ n: number }]>`select count(*)::int as n from outbox where state = 'pending'`;
      return row.n === 0;
    }, remaining(), 500);
    await sandbox.state.automationIdle();

    // ---- what the sink must hold ---------------------------------------------------------------
    const summary = await sink.summary();
    const deliveredVersions = new Set<string>();
    const deliveredDeletes = new Set<string>();
    let duplicateKeys = 0;
    let extraDeliveries = 0;
    for (const [, count, object, crmId, version, change] of summary.keys) {
      deliveredVersions.add(`${object}/${crmId}/${version}`);
      if (change === 'delete') deliveredDeletes.add(`${object}/${crmId}`);
      if (count > 1) {
        duplicateKeys++;
        extraDeliveries += count - 1;
      }
    }
    const written = await sql<Array<{ object: string; crm_id: string; crm_version: string | null }>>`select object, crm_id, crm_version from outbound_writes where state = 'sent' and crm_id is not null`;
    // The bridges' own versions: those their writes record, and every version the CRM proxy saw a
    // write of theirs make (a write whose answer was lost is settled without one).
    const ownVersions = new Set([...written.filter((w) => w.crm_version !== null).map((w) => `${w.object}/${w.crm_id}/${w.crm_version}`), ...crm.written]);
    // Writes not made, by state and last status, with one of their errors without its URL (a
    // pipeline update of a record the CRM deleted meanwhile fails, rightly, as does a lead whose
    // client staff deleted before it was made).
    const unmade = await sql<Array<{ state: string; reason: string | null; n: number }>>`
      select state, min(regexp_replace(last_error, '\\m(GET|POST|PATCH|PUT|DELETE) https?://\\S+ ?', '', 'g')) as reason, count(*)::int as n
      from outbound_writes where not (state = 'sent' and crm_id is not null) group by state, last_status order by 3 desc`;
    const known = await sql<Array<{ object: string; crm_id: string }>>`select distinct object, crm_id from ledger where connection_id = 'firm'`;
    const knownRecords = new Set(known.map((k) => `${k.object}/${k.crm_id}`));
    const [dead] = await sql<[{ n: number }]>`select count(*)::int as n from outbox where state = 'dead'`;

    // Expected, precisely:
    //  1. every record in the CRM at the end, at its final version, unless that version is the
    //     bridge's own write (its echo is never delivered);
    //  2. every deleted record the bridge ever knew (a ledger row, or a hook it accepted), as a delete;
    //  3. every version a bridge answered 202 to by hook (accepted means committed for delivery).
    // A version superseded before any hook or poll saw it is not expected: the CRM no longer has it.
    const expected = new Map<string, string>();
    for (const object of ['matters', 'contacts'] as const) {
      const items = object === 'matters' ? sandbox.state.store.matters.items : sandbox.state.store.contacts.items;
      for (const item of items) {
        const version = String(sandbox.state.renderFull(object, item.id)?.etag);
        const key = `${object}/${item.id}/${version}`;
        if (!ownVersions.has(key)) expected.set(key, 'final version');
      }
    }
    const acceptedHooks = relay.hooks.filter((h: RelayedHook) => h.status === 202);
    for (const h of acceptedHooks) {
      if (h.event === 'deleted') knownRecords.add(`${h.object}/${h.crmId}`);
      else expected.set(`${h.object}/${h.crmId}/${h.version}`, expected.get(`${h.object}/${h.crmId}/${h.version}`) ?? 'accepted hook');
    }
    let expectedDeletes = 0;
    const lostDeleteRecords: string[] = [];
    for (const d of tracker.deleted) {
      const record = `${d.object}/${d.id}`;
      if (!knownRecords.has(record)) continue;
      expectedDeletes++;
      if (!deliveredDeletes.has(record)) lostDeleteRecords.push(record);
    }
    const lostDeletes = lostDeleteRecords.length;
    const lostVersions = [...expected.keys()].filter((k) => !deliveredVersions.has(k));
    const lost = lostVersions.length + lostDeletes;
    const looped = summary.keys.filter(([, , object, crmId, version]) => ownVersions.has(`${object}/${crmId}/${version}`));
    const loopedEchoes = looped.length;
    for (const [key, count, object, crmId, version, change, source] of looped.slice(0, 10)) {
      const writes = await sql`select id, operation, state, attempts, crm_version, settled_at, created_at, updated_at from outbound_writes where object = ${object} and crm_id = ${crmId} order by created_at`;
      const rows = await sql`select event_id, source, disposition, version, observed_at from ledger where object = ${object} and crm_id = ${crmId} order by observed_at`;
      log(`looped echo: key ${key} x${count} ${object}/${crmId} ${version} ${change} via ${source}; writes ${JSON.stringify(writes)}; ledger ${JSON.stringify(rows)}`);
    }
    const reuse = sandbox.state.oauth.listGrants().filter((g) => (g.revokedReason ?? '').includes('reused')).length;
    const hook5xx = relay.hooks.filter((h) => h.status >= 500).length;
    const unreachable = relay.hooks.filter((h) => h.status === 0).length;
    if (lostVersions.length > 0) log(`lost, first 10: ${lostVersions.slice(0, 10).map((k) => `${k} (${expected.get(k)})`).join(', ')}`);
    for (const record of lostDeleteRecords.slice(0, 10)) {
      const [object, crmId] = record.split('/') as [string, string];
      const rows = await sql`select source, change, disposition, version, observed_at from ledger where object = ${object} and crm_id = ${crmId} order by seq`;
      log(`lost delete: ${record}; ledger ${JSON.stringify(rows)}`);
    }

    const requests = sandbox.state.requestLog.list({});
    const faults = { error: 0, tokens401: 0 };
    for (const r of requests) {
      if (r.fault === 'error') faults.error++;
      if (r.status === 401) faults.tokens401++;
    }
    const proxyStats = crm.stats();
    const checks: SoakCheck[] = [
      { name: 'lost', value: lost, limit: '= 0', ok: lost === 0 },
      { name: 'keys delivered more than once', value: duplicateKeys, limit: `<= ${inFlightAtChaos} (in flight at a kill or restart)`, ok: duplicateKeys <= inFlightAtChaos },
      { name: 'looped echoes', value: loopedEchoes, limit: '= 0', ok: loopedEchoes === 0 },
      { name: 'refresh-token reuse detected by the sandbox', value: reuse, limit: '= 0', ok: reuse === 0 },
      { name: '5xx answered to hooks', value: hook5xx, limit: '= 0', ok: hook5xx === 0 },
    ];
    const fmt = (n: number) => n.toLocaleString('en-US');
    const rows: Array<[string, string]> = [
      ['CRM changes made', `${fmt(made)} (${fmt(tracker.made.updates)} edits, ${fmt(tracker.made.creates)} creates, ${fmt(tracker.made.deletes)} deletes, ${fmt(tracker.made.bulk)} bulk-imported on shared timestamps)`],
      ['pipeline writes', `${fmt(options.writes)} (${fmt(writeResults.accepted)} accepted, ${fmt(writeResults.failed)} refused, ${fmt(writeResults.attempts)} attempts); ${fmt(written.length)} made in the CRM${unmade.length > 0 ? `; not made: ${unmade.map((u) => `${fmt(u.n)} ${u.state}${u.reason ? ` (${u.reason})` : ''}`).join(', ')}` : ''}`],
      ['hooks', `${fmt(relay.hooks.length)} relayed (${fmt(acceptedHooks.length)} accepted; ${fmt(sandbox.state.automation.entries().filter((e) => e.status === 'dropped').length)} dropped by the automation; ${fmt(unreachable)} found no bridge)`],
      ['lies seen by the bridges', `${fmt(faults.error)} injected 5xx, ${fmt(proxyStats.rateLimited)} 429s, ${fmt(faults.tokens401)} 401s from dead tokens, clock skew ${LIES.clockSkewSeconds} s`],
      ['chaos', chaos.length ? chaos.join('; ') : 'none'],
      ['after the Postgres restart', options.pgRestarts ? `${bridgesSurvivedPg} bridge process(es) survived, ${bridgeRestartsAfterPg} restarted by the driver` : 'n/a'],
      ['changes expected', `${fmt(expected.size + expectedDeletes)} (${fmt([...expected.values()].filter((v) => v === 'final version').length)} final versions, ${fmt([...expected.values()].filter((v) => v === 'accepted hook').length)} other versions accepted by hook, ${fmt(expectedDeletes)} deletes)`],
      ['delivered (unique keys at the sink)', `${fmt(summary.keys.length)} (${fmt(summary.requests)} requests)`],
      ['lost', fmt(lost)],
      ['duplicate deliveries of one key', `${fmt(duplicateKeys)} keys, ${fmt(extraDeliveries)} extra requests (allowed: ${fmt(inFlightAtChaos)} in flight at a kill or restart)`],
      ['looped echoes', fmt(loopedEchoes)],
      ['refresh-token reuse detected by the sandbox', fmt(reuse)],
      ['5xx answered to hooks', fmt(hook5xx)],
      ['dead letters', fmt(dead.n)],
    ];
    const seconds = Math.round((Date.now() - started) / 1000);
    rows.push(['wall time', `${seconds} s`]);
    const ok = checks.every((c) => c.ok);
    keepLogs = !ok;
    if (keepLogs) log(`bridge logs kept in ${dir}`);
    return { rows, checks, ok, seconds };
  } finally {
    for (const bridge of bridges) await bridge.stop().catch(() => {});
    for (const cleanup of cleanups) await cleanup().catch(() => {});
    if (!keepLogs) rmSync(dir, { recursive: true, force: true });
  }
}

export function formatTable(result: SoakResult): string {
  const width = Math.max(...result.rows.map(([k]) => k.length));
  const lines = result.rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`);
  lines.push('', ...result.checks.map((c) => `${c.ok ? 'ok  ' : 'FAIL'}  ${c.name}: ${c.value.toLocaleString('en-US')} (${c.limit})`));
  return lines.join('\n');
}
