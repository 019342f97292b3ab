import { spawn } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { loadConfig } from '../src/config/load.js';
import { connection } from './helpers/app.js';
import { crmBridge } from './helpers/cli.js';

/**
 * DATABASE_URL pointing at something that accepts TCP but is not Postgres (a wrong port, another
 * service on it). These tests open no database of the run's own: the bridge is pointed at a
 * server each test starts, whatever DATABASE_URL the run has.
 */

const PASSWORD = 'not-for-the-logs-7d1e';
const servers: net.Server[] = [];
const sockets = new Set<net.Socket>();
afterEach(async () => {
  for (const socket of sockets) socket.destroy();
  sockets.clear();
  await Promise.all(servers.splice(0).map((server) => new Promise((resolve) => server.close(resolve))));
});

/** A server on a free port that does `onConnection` with every connection it accepts. */
async function notPostgres(onConnection: (socket: net.Socket) => void): Promise<number> {
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    onConnection(socket);
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return (server.address() as net.AddressInfo).port;
}

/** DATABASE_URL for that port, with postgres.js's connect timeout (seconds) set in it as an operator would. */
function databaseUrl(port: number): string {
  return `postgres://postgres:${PASSWORD}@127.0.0.1:${port}/crm?connect_timeout=1`;
}

/** The app as `crm-bridge serve` builds it: opening and migrating the database named by DATABASE_URL. */
async function startFailure(port: number): Promise<Error & { code?: string }> {
  const config = loadConfig({ LOG_LEVEL: 'silent', DATA_DIR: 'memory://', DATABASE_URL: databaseUrl(port) }, { connections: [connection()] });
  return buildApp({ config, loggerInstance: pino({ level: 'silent' }) }).then(
    async (app) => {
      await app.close();
      throw new Error('the app started');
    },
    (failure: unknown) => failure as Error & { code?: string },
  );
}

function expectClearRefusal(err: Error & { code?: string }, port: number) {
  // Not Fastify's plugin timeout (FST_ERR_PLUGIN_TIMEOUT), nor postgres.js's bare `write CONNECT_TIMEOUT`.
  expect(err.code).toBe('DATABASE_UNREACHABLE');
  expect(err.message).toContain(`127.0.0.1:${port}`);
  expect(err.message).toContain('did not answer as Postgres');
  expect(err.message).not.toContain(PASSWORD);
}

describe('a DATABASE_URL that does not lead to Postgres', () => {
  // The guard is for a hang on the old behaviour (the start waited for the plugin timeout);
  // the assertions are on the error.
  const hangGuard = { timeout: 20_000 };

  it('a server that accepts and never answers fails the start with an error naming host:port, not the password', hangGuard, async () => {
    const port = await notPostgres(() => {});
    const err = await startFailure(port);
    expectClearRefusal(err, port);
    expect(err.message).toContain('no answer within 1 s');
  });

  it('a server that accepts and closes at once fails the start the same way (postgres.js alone reconnects to it without end)', hangGuard, async () => {
    const port = await notPostgres((socket) => socket.end());
    expectClearRefusal(await startFailure(port), port);
  });

  it('a server that writes something other than Postgres (an SSH banner) fails the start the same way', hangGuard, async () => {
    const port = await notPostgres((socket) => socket.write('SSH-2.0-OpenSSH_9.6\r\n'));
    expectClearRefusal(await startFailure(port), port);
  });

  it('an HTTP server (answers the startup message with a 400 and closes) fails the start the same way', hangGuard, async () => {
    const port = await notPostgres((socket) => socket.once('data', () => socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n')));
    expectClearRefusal(await startFailure(port), port);
  });

  it('crm-bridge serve exits 1 with that one error on stderr', hangGuard, async () => {
    const port = await notPostgres(() => {});
    const child = spawn(process.execPath, crmBridge('serve'), {
      env: { ...process.env, PORT: '0', LOG_LEVEL: 'silent', DATA_DIR: mkdtempSync(join(tmpdir(), 'crm-bridge-unreachable-')), CRM_BRIDGE_CONFIG: '', DATABASE_URL: databaseUrl(port) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdout.resume();
    const status = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    expect(status).toBe(1);
    expect(stderr).toMatch(new RegExp(`^crm-bridge: The database at 127\\.0\\.0\\.1:${port} \\(DATABASE_URL\\) did not answer as Postgres \\(no answer within 1 s\\)`));
    expect(stderr).not.toContain(PASSWORD);
    expect(stderr).not.toMatch(/plugin/i);
  });
});
