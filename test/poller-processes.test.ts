import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { and, eq, sql } from 'drizzle-orm';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { ledger, leases } from '../src/db/schema/index.js';
import { startSandbox, type Sandbox } from '../src/sandbox/index.js';
import { SECRET } from './helpers/app.js';
import { TEST_TOKEN_KEY } from './helpers/bridge.js';
import { crmBridge } from './helpers/cli.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

// Separate bridge processes need a database they can share: Postgres. PGlite is one process's.
const onPostgres = Boolean(process.env.DATABASE_URL);
const database = onPostgres ? await createTestDatabase() : undefined;
const children: ChildProcess[] = [];
let sandbox: Sandbox | undefined;

afterEach(async () => {
  for (const child of children.splice(0)) child.kill('SIGKILL');
  await sandbox?.close();
  sandbox = undefined;
});
afterAll(() => database?.close());

/** `crm-bridge serve` in its own process, polling the sandbox with its own static token. */
function startBridgeProcess(name: string, token: string) {
  const dir = mkdtempSync(join(tmpdir(), `crm-bridge-${name}-`));
  const config = join(dir, 'connections.yaml');
  writeFileSync(
    config,
    JSON.stringify({
      connections: [
        {
          id: 'firm',
          connector: 'clio',
          baseUrl: sandbox!.url,
          auth: { type: 'static', token },
          inbound: { secrets: [SECRET], recordPath: 'data', object: 'matters' },
          poll: { objects: ['matters'], interval: '200ms', jitter: 0, lookback: '2m', pageSize: 5, lease: '2s', sweepInterval: 0 },
        },
      ],
    }),
  );
  const child = spawn(process.execPath, crmBridge('serve'), {
    env: { ...process.env, DATABASE_URL: database!.url!, CRM_BRIDGE_CONFIG: config, PORT: '0', LOG_LEVEL: 'warn', INSTANCE_ID: name, TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY, DATA_DIR: dir },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d));
  child.stderr!.on('data', (d: Buffer) => (output += d));
  children.push(child);
  return { child, output: () => output };
}

function listRequests() {
  return sandbox!.state.requestLog.list({ pathPrefix: '/api/v4/matters.json' });
}

async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

async function acceptedPerRecord() {
  const rows = await database!.db
    .select({ crmId: ledger.crmId, n: sql<number>`count(*)`.mapWith(Number) })
    .from(ledger)
    .where(and(eq(ledger.connectionId, 'firm'), eq(ledger.disposition, 'accepted')))
    .groupBy(ledger.crmId);
  return new Map(rows.map((r) => [r.crmId, r.n]));
}

describe.skipIf(!onPostgres)('poller replicas in separate processes on one Postgres', () => {
  it('lets one process poll a stream at a time, and the other takes over within the lease expiry when it is killed', async () => {
    await resetDatabase(database!);
    sandbox = await startSandbox({ records: 60 });
    const tokens = { a: sandbox.state.issueToken().access_token, b: sandbox.state.issueToken().access_token };
    const tokenIdOf = (token: string) => sandbox!.state.oauth.checkAccess(token).tokenId;
    const pollerOf: Record<string, string> = { [tokenIdOf(tokens.a)!]: 'a', [tokenIdOf(tokens.b)!]: 'b' };
    const a = startBridgeProcess('a', tokens.a);
    const b = startBridgeProcess('b', tokens.b);

    await until('both processes polling for a while', () => listRequests().length >= 20);
    const holder = (await database!.db.select().from(leases).where(eq(leases.name, 'poll:firm:matters')))[0]!.owner.split(':')[0]!;
    const pollers = new Set(listRequests().map((e) => pollerOf[e.auth.tokenId ?? '']));
    expect(pollers).toEqual(new Set([holder]));

    const killedAt = Date.now();
    (holder === 'a' ? a : b).child.kill('SIGKILL');
    const survivor = holder === 'a' ? 'b' : 'a';
    const before = listRequests().length;
    await until('the other process to take the stream over', () => listRequests().slice(before).some((e) => pollerOf[e.auth.tokenId ?? ''] === survivor));
    const takeover = listRequests().slice(before).find((e) => pollerOf[e.auth.tokenId ?? ''] === survivor)!;
    // Lease 2 s, interval 200 ms: the survivor's first request comes within expiry plus a tick.
    expect(Date.parse(takeover.at) - killedAt).toBeLessThan(2_000 + 1_500);
    const sequence = listRequests().map((e) => pollerOf[e.auth.tokenId ?? '']);
    const switches = sequence.filter((p, i) => i > 0 && p !== sequence[i - 1]).length;
    expect(switches).toBe(1);
  });

  it('loses nothing when the polling process is killed with SIGKILL part-way through a run', async () => {
    await resetDatabase(database!);
    sandbox = await startSandbox({ records: 100, switches: { latencyMs: 60 } });
    const token = sandbox.state.issueToken().access_token;
    const first = startBridgeProcess('first', token);
    await until('three pages read', () => listRequests().length >= 3);
    first.child.kill('SIGKILL');
    const committed = (await acceptedPerRecord()).size;
    expect(committed).toBeLessThan(50);

    startBridgeProcess('second', token);
    const ids = sandbox.state.store.matters.items.map((m) => String(m.id));
    await until('every matter in the ledger', async () => (await acceptedPerRecord()).size === ids.length);
    const perRecord = await acceptedPerRecord();
    expect([...perRecord.keys()].sort()).toEqual([...ids].sort());
    expect([...perRecord.values()].every((n) => n === 1)).toBe(true);
  });
});
