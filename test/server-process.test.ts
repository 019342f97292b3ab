import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import http from 'node:http';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { connection, SECRET } from './helpers/app.js';
import { crmBridge } from './helpers/cli.js';
import { createTestDatabase } from './helpers/database.js';

const dataDir = mkdtempSync(join(tmpdir(), 'crm-bridge-serve-'));
const children: ChildProcess[] = [];
afterAll(() => children.forEach((c) => c.kill('SIGKILL')));

/**
 * Starts `crm-bridge serve` on the embedded database and resolves with its address and output:
 * as `npm start` does (under tsx) with `npmStart` or `cwd`, else compiled, as the image runs it.
 */
function serve(env: Record<string, string>, options: { cwd?: string; npmStart?: boolean } = {}) {
  const args = options.cwd
    ? // From another working directory, by absolute paths (a service manager's unit, say).
      ['--import', pathToFileURL(resolve('node_modules/tsx/dist/loader.mjs')).href, resolve('src/cli.ts'), 'serve']
    : options.npmStart
      ? ['--import', 'tsx', 'src/cli.ts', 'serve']
      : crmBridge('serve');
  const child = spawn(process.execPath, args, {
    // npm start on a fresh machine: the embedded database, whatever the test run uses.
    env: { ...process.env, PORT: '0', LOG_LEVEL: 'info', DATA_DIR: dataDir, CRM_BRIDGE_CONFIG: '', DATABASE_URL: '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(options.cwd ? { cwd: options.cwd } : {}),
  });
  children.push(child);
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  const ready = new Promise<string>((resolve, reject) => {
    child.stdout!.on('data', () => {
      const match = /listening on (http:\/\/[\d.:]+)/.exec(output);
      if (match) resolve(match[1]!);
    });
    child.on('exit', (code) => reject(new Error(`exited ${code}: ${output}`)));
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, ready, exited, output: () => output };
}

async function waitFor(check: () => boolean, timeoutMs = 40_000) {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 100));
  }
}

// The embedded database's tests run once, in the run on the embedded database: they start the
// bridge without DATABASE_URL whatever the run's database. Under DATABASE_URL only the tests that
// use it run.
const embedded = it.skipIf(Boolean(process.env.DATABASE_URL));

describe('crm-bridge serve', () => {
  embedded('runs the whole demo on the embedded database: prints where everything is and a working curl, tells the story, stops cleanly on SIGTERM', async () => {
    const server = serve({}, { npmStart: true });
    const base = await server.ready;
    await waitFor(() => /Ctrl-C stops everything/.test(server.output()));
    expect(server.output()).toMatch(/sandbox CRM: +http:\/\/127\.0\.0\.1:\d+/);
    expect(server.output()).toMatch(/pipeline: +http:\/\/127\.0\.0\.1:\d+\/intake/);
    expect(server.output()).toMatch(/status page: +http/);
    const secret = readFileSync(join(dataDir, 'demo-hook-secret'), 'utf8').trim();
    expect(server.output()).toContain(`Authorization: Bearer ${secret}`);
    expect(server.output()).toContain(`${base}/hooks/demo`);

    const hook = await fetch(`${base}/hooks/demo`, {
      method: 'POST',
      headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json' },
      body: JSON.stringify({ data: { id: 1001, updated_at: '2026-11-26T10:00:00Z', status: 'Open' } }),
    });
    expect(hook.status).toBe(202);
    expect((await fetch(`${base}/health`)).status).toBe(200);
    // Staff edit the CRM every few seconds; its automation calls the hook; the pipeline receives it.
    await waitFor(() => /connection authorised/.test(server.output()) && /hook accepted: demo matters/.test(server.output()) && /pipeline received/.test(server.output()));

    server.child.kill('SIGTERM');
    expect(await server.exited).toBe(0);
    expect(server.output()).toMatch(/crm-bridge is stopping/);
  });

  embedded('keeps the demo secret and the ledger across a restart', async () => {
    const server = serve({});
    const base = await server.ready;
    const secret = readFileSync(join(dataDir, 'demo-hook-secret'), 'utf8').trim();
    const again = await fetch(`${base}/hooks/demo`, {
      method: 'POST',
      headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json' },
      body: JSON.stringify({ data: { id: 1001, updated_at: '2026-11-26T10:00:00Z', status: 'Open' } }),
    });
    expect(await again.json()).toMatchObject({ status: 'duplicate' });
    server.child.kill('SIGINT');
    expect(await server.exited).toBe(0);
  });

  // A 202 is given after the commit, and PGlite has written the commit to its files by then: a
  // process killed outright (the OOM killer, kill -9) loses nothing it answered.
  embedded('keeps every hook it answered when the process is killed with SIGKILL, and starts again on the same data', async () => {
    const post = (base: string, secret: string, id: number) =>
      fetch(`${base}/hooks/demo`, {
        method: 'POST',
        headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json' },
        body: JSON.stringify({ data: { id, updated_at: '2026-11-27T10:00:00Z', status: 'Open' } }),
      }).then(async (r) => ({ status: r.status, body: (await r.json()) as { status: string; eventId: string } }));
    const secret = readFileSync(join(dataDir, 'demo-hook-secret'), 'utf8').trim();
    const first = serve({});
    const answered = await Promise.all([3001, 3002, 3003].map(async (id) => post(await first.ready, secret, id)));
    expect(answered.map((a) => a.status)).toEqual([202, 202, 202]);
    first.child.kill('SIGKILL');
    await first.exited;

    const second = serve({});
    const base = await second.ready;
    const again = await Promise.all([3001, 3002, 3003].map((id) => post(base, secret, id)));
    expect(again.map((a) => a.body)).toEqual(answered.map((a) => ({ status: 'duplicate', eventId: a.body.eventId })));
    second.child.kill('SIGTERM');
    expect(await second.exited).toBe(0);
  });

  embedded('keeps a CLI command off the embedded database while the server runs on it, with one line saying why, and lets it on once the server stopped', async () => {
    const cli = (args: string[]) =>
      new Promise<{ code: number | null; out: string }>((resolve) => {
        const child = spawn(process.execPath, crmBridge(...args), {
          env: { ...process.env, DATA_DIR: dataDir, CRM_BRIDGE_CONFIG: '', DATABASE_URL: '' },
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        let out = '';
        child.stdout.on('data', (d: Buffer) => (out += d.toString()));
        child.stderr.on('data', (d: Buffer) => (out += d.toString()));
        child.on('exit', (code) => resolve({ code, out }));
      });
    const server = serve({});
    const base = await server.ready;
    const refused = await cli(['dead-letters']);
    expect(refused.code).toBe(1);
    expect(refused.out).toMatch(new RegExp(`in use by another crm-bridge process \\(pid ${server.child.pid}\\)`));
    expect(refused.out).not.toMatch(/\n\s+at /);
    expect((await fetch(`${base}/health/live`)).status).toBe(200);
    server.child.kill('SIGTERM');
    expect(await server.exited).toBe(0);

    const after = await cli(['dead-letters']);
    expect(after.out).not.toMatch(/in use/);
    expect(after.code).toBe(0);
  });

  embedded('says what the embedded database cannot do when it serves a real connections file', async () => {
    const config = join(dataDir, 'connections.json');
    writeFileSync(config, JSON.stringify({ connections: [connection()] }));
    const server = serve({ CRM_BRIDGE_CONFIG: config });
    await server.ready;
    await waitFor(() => /embedded database:/.test(server.output()));
    expect(server.output()).toMatch(/embedded database: one process only; set DATABASE_URL to run replicas/);
    expect(server.output()).not.toMatch(/this is the demo/);
    server.child.kill('SIGTERM');
    expect(await server.exited).toBe(0);
  });

  // A load balancer or a CRM's HTTP client keeps its connections open between requests. One
  // busy with a hook when SIGTERM came must be closed once the hook is answered: the server waits
  // for every connection to end before the daemons stop and the database closes.
  it('answers a hook in flight on a keep-alive connection when SIGTERM comes, closes that connection, and stops cleanly within the grace period', async () => {
    const config = join(dataDir, 'keep-alive.json');
    writeFileSync(config, JSON.stringify({ connections: [connection()] }));
    // On the database of the test run: the shutdown's order is the same on both.
    const database = process.env.DATABASE_URL ? await createTestDatabase() : undefined;
    const server = serve({ CRM_BRIDGE_CONFIG: config, DATA_DIR: mkdtempSync(join(tmpdir(), 'crm-bridge-keep-alive-')), DATABASE_URL: database?.url ?? '' });
    const base = new URL(await server.ready);
    const agent = new http.Agent({ keepAlive: true });
    const body = JSON.stringify({ id: 4001, updated_at: '2026-11-27T10:00:00Z', status: 'Open' });
    const request = http.request({
      host: base.hostname,
      port: base.port,
      path: '/hooks/acme',
      method: 'POST',
      agent,
      headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    });
    const answer = new Promise<{ status: number | undefined; connection: string | undefined; text: string }>((resolve, reject) => {
      request.on('response', (res) => {
        let text = '';
        res.on('data', (d: Buffer) => (text += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode, connection: res.headers.connection, text }));
      });
      request.on('error', reject);
    });
    // Half the body now, so the hook is in flight when the signal comes; the rest after it.
    request.write(body.slice(0, 5));
    await new Promise((r) => setTimeout(r, 300));
    server.child.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 200));
    request.end(body.slice(5));
    try {
      expect(await answer).toMatchObject({ status: 202, connection: 'close' });
      // Exit 0 and no "killed by timeout": it stopped within its grace period, daemons and database closed.
      expect(await server.exited).toBe(0);
      expect(server.output()).not.toMatch(/killed by timeout/);
    } finally {
      agent.destroy();
      await database?.close();
    }
  });

  embedded('fails at start with one error naming every bad value, exit status 2', async () => {
    const server = serve({ PORT: 'eighty', LOG_LEVEL: 'chatty' });
    await expect(server.ready).rejects.toThrow();
    expect(await server.exited).toBe(2);
    expect(server.output()).toMatch(/PORT/);
    expect(server.output()).toMatch(/LOG_LEVEL/);
    expect(server.output()).not.toMatch(/\n\s+at .*\.ts:\d+/);
  });

  embedded('creates its embedded database when started from another working directory', async () => {
    const elsewhere = mkdtempSync(join(tmpdir(), 'crm-bridge-elsewhere-'));
    const server = serve({ DATA_DIR: join(elsewhere, 'data') }, { cwd: elsewhere });
    const base = await server.ready;
    expect((await fetch(`${base}/health/live`)).status).toBe(200);
    server.child.kill('SIGTERM');
    expect(await server.exited).toBe(0);
  });

  // A first start killed while it creates the database (an orchestrator's start timeout, the OOM
  // killer) leaves half a database behind; the next start must create it again, not fail on it
  // or take it for a whole one.
  // SIGKILL to the bridge alone (the OOM killer): the process creating its database is left
  // running on, and must not move a database into place once the bridge is gone.
  embedded('starts on a new data directory after a first start was killed with SIGKILL while creating its database', async () => {
    const fresh = mkdtempSync(join(tmpdir(), 'crm-bridge-cut-'));
    const first = serve({ DATA_DIR: fresh });
    first.ready.catch(() => {});
    // initdb has written a good part of the database (it writes about 1,000 files).
    const written = () => readdirSync(fresh, { recursive: true }).length;
    await waitFor(() => written() > 300, 60_000);
    first.child.kill('SIGKILL');
    await first.exited;

    // The half-made database was beside the data directory, never in it, and stays there.
    await new Promise((r) => setTimeout(r, 3_000));
    expect(existsSync(join(fresh, 'pgdata.creating'))).toBe(true);
    expect(existsSync(join(fresh, 'pgdata', 'PG_VERSION'))).toBe(false);
    const second = serve({ DATA_DIR: fresh });
    const base = await second.ready;
    expect((await fetch(`${base}/health/live`)).status).toBe(200);
    expect(existsSync(join(fresh, 'pgdata.creating'))).toBe(false);
    const secret = readFileSync(join(fresh, 'demo-hook-secret'), 'utf8').trim();
    const hook = await fetch(`${base}/hooks/demo`, {
      method: 'POST',
      headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json' },
      body: JSON.stringify({ data: { id: 4001, updated_at: '2026-11-28T10:00:00Z', status: 'Open' } }),
    });
    expect(hook.status).toBe(202);
    second.child.kill('SIGTERM');
    expect(await second.exited).toBe(0);
    // Two database creations (initdb, synced): about 20 s alone, three times that on a busy machine.
  }, 180_000);

  embedded('stops creating its database when SIGTERM stops the first start (sent to it alone), so the next start makes it whole and runs', async () => {
    const fresh = mkdtempSync(join(tmpdir(), 'crm-bridge-stopped-'));
    const first = serve({ DATA_DIR: fresh });
    first.ready.catch(() => {});
    const staged = () => (existsSync(join(fresh, 'pgdata.creating')) ? readdirSync(join(fresh, 'pgdata.creating'), { recursive: true }).length : 0);
    await waitFor(() => staged() > 100, 60_000);
    first.child.kill('SIGTERM');
    await first.exited;

    // Nothing moves a database into the data directory once the bridge is gone.
    await new Promise((r) => setTimeout(r, 3_000));
    expect(existsSync(join(fresh, 'pgdata', 'PG_VERSION'))).toBe(false);

    const second = serve({ DATA_DIR: fresh });
    const base = await second.ready;
    expect((await fetch(`${base}/health/live`)).status).toBe(200);
    second.child.kill('SIGTERM');
    expect(await second.exited).toBe(0);
  }, 180_000);

  embedded('fails at start saying why when the embedded database cannot be created in its directory, exit status 1', async () => {
    const blocked = mkdtempSync(join(tmpdir(), 'crm-bridge-blocked-'));
    // A file where the new database needs a directory: the half-written leftovers of something else.
    mkdirSync(join(blocked, 'pgdata'));
    writeFileSync(join(blocked, 'pgdata', 'base'), '');
    const server = serve({ DATA_DIR: blocked });
    await expect(server.ready).rejects.toThrow();
    expect(await server.exited).toBe(1);
    expect(server.output()).toContain(`because: Could not create the embedded database in ${join(blocked, 'pgdata')}: it holds files but no database; the directory must be empty or not exist yet`);
    // What it made beside the directory is gone with it.
    expect(existsSync(join(blocked, 'pgdata.creating'))).toBe(false);
    expect(server.output()).not.toMatch(/\n\s+at /);
  });

  embedded('fails at start saying the disk is full when DATA_DIR has no room for a new database, and gives back what it wrote', async (context) => {
    const disk = mkdtempSync(join(tmpdir(), 'crm-bridge-full-'));
    // A real small disk: a tmpfs of 8 MB (a new database takes about 40). Mounting needs root.
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', disk], { stdio: 'ignore' });
    } catch {
      context.skip();
    }
    try {
      const server = serve({ DATA_DIR: join(disk, 'data') });
      await expect(server.ready).rejects.toThrow();
      expect(await server.exited).toBe(1);
      expect(server.output()).toContain(`because: Could not create the embedded database in ${join(disk, 'data', 'pgdata')}: the disk is full (ENOSPC)`);
      expect(server.output()).not.toContain('the directory must be empty');
      expect(existsSync(join(disk, 'data', 'pgdata.creating'))).toBe(false);
    } finally {
      // Lazily, so a file still open cannot leave the test failing on its way out.
      execFileSync('umount', ['-l', disk]);
      rmSync(disk, { recursive: true, force: true });
    }
  }, 60_000);
});
