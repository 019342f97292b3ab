import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startSandbox, type Sandbox } from '../src/sandbox/index.js';
import { clioConnection, TEST_TOKEN_KEY } from './helpers/bridge.js';
import { createTestDatabase } from './helpers/database.js';

let sandbox: Sandbox;
// The CLI runs on the embedded database, or on a fresh Postgres database when DATABASE_URL is set.
const database = process.env.DATABASE_URL ? await createTestDatabase() : undefined;
const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-cli-'));
const config = join(dir, 'connections.json');

beforeAll(async () => {
  sandbox = await startSandbox({ records: 60 });
  writeFileSync(config, JSON.stringify({ connections: [clioConnection(sandbox, { poll: { pageSize: 10 } })] }));
});
afterAll(async () => {
  await sandbox.close();
  await database?.close();
});

/** Starts `crm-bridge <args>` on the embedded database in a fresh DATA_DIR (or DATABASE_URL). */
function start(args: string[], dataDir = dir) {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli.ts', ...args], {
    env: { ...process.env, CRM_BRIDGE_CONFIG: config, DATA_DIR: dataDir, TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY, DATABASE_URL: database?.url ?? '' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d));
  child.stderr.on('data', (d: Buffer) => (out += d));
  const exited = new Promise<{ code: number | null; out: string }>((resolve) => child.on('exit', (code) => resolve({ code, out })));
  return { child, exited, out: () => out };
}

/** Runs `crm-bridge <args>` to its end. */
function cli(args: string[], dataDir = dir): Promise<{ code: number | null; out: string }> {
  return start(args, dataDir).exited;
}

describe('crm-bridge poll and sweep', () => {
  it('polls once with a progress line and a summary, then finds nothing new the second time', async () => {
    const first = await cli(['poll', 'firm', '--once']);
    expect(first.code).toBe(0);
    expect(first.out).toMatch(/poll firm\/matters: 3 page\(s\), 30 record\(s\), 30 new/);
    expect(first.out).toMatch(/firm\/matters: poll done: 30 accepted/);
    const second = await cli(['poll', 'firm', '--once']);
    expect(second.code).toBe(0);
    expect(second.out).toMatch(/poll done: (\d+ duplicate|no changes)/);
  });

  it('keeps polling on the interval without --once, and stops at once on Ctrl-C, not after the interval', async () => {
    const follow = start(['poll', 'firm']);
    for (let i = 0; i < 600 && !/poll done/.test(follow.out()); i++) await new Promise((r) => setTimeout(r, 50));
    expect(follow.out()).toMatch(/firm\/matters: poll done/);
    // The next pass is an hour away (the connection's interval).
    follow.child.kill('SIGINT');
    expect((await follow.exited).code).toBe(0);
  });

  it('sweeps and reports deletes', async () => {
    sandbox.state.deleteRecord('matters', sandbox.state.store.matters.items[0]!.id);
    const swept = await cli(['sweep', 'firm']);
    expect(swept.code).toBe(0);
    expect(swept.out).toMatch(/sweep done: .*1 deleted/);
  });

  it('answers an unknown connection with one line and exit status 2', async () => {
    const res = await cli(['poll', 'nope', '--once']);
    expect(res.code).toBe(2);
    expect(res.out.trim().split('\n')).toHaveLength(1);
    expect(res.out).toMatch(/no connection "nope"/);
  });

  it('shows usage and exits 2 on a bad argument', async () => {
    const res = await cli(['poll']);
    expect(res.code).toBe(2);
    expect(res.out).toMatch(/missing required argument 'connection'/);
    expect(res.out).toMatch(/Usage: crm-bridge poll/);
  });
});
