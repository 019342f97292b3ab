import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TokenCipher } from '../../src/crm/crypto.js';
import { openDatabase } from '../../src/db/client.js';
import { getTokenRow } from '../../src/db/queries/tokens.js';
import { startSandbox, type Sandbox } from '../../src/sandbox/index.js';
import { connection } from '../helpers/app.js';
import { crmBridge } from '../helpers/cli.js';
import { createTestDatabase } from '../helpers/database.js';
import { apiRequests, TEST_KEY } from '../fixtures/token-helpers.js';

let sb: Sandbox;

beforeAll(async () => {
  sb = await startSandbox({ records: 5, autoApprove: true });
});
afterAll(() => sb.close());

/** A connections file and the environment for one CLI run: Postgres when DATABASE_URL is set, else PGlite on disk. */
async function setup() {
  const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-auth-'));
  const file = join(dir, 'connections.json');
  const auth = { type: 'oauth2', clientId: 'sandbox-client', clientSecret: '${SANDBOX_CLIENT_SECRET}', tokenUrl: '/oauth/token', authorizeUrl: '/oauth/authorize' };
  writeFileSync(file, JSON.stringify({ connections: [connection({ auth, baseUrl: sb.url }), connection({ id: 'plain' })] }));
  const database = process.env.DATABASE_URL ? await createTestDatabase() : undefined;
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? '',
    CRM_BRIDGE_CONFIG: file,
    DATA_DIR: join(dir, 'data'),
    LOG_LEVEL: 'silent',
    SANDBOX_CLIENT_SECRET: 'sandbox-secret',
    ...(database?.url ? { DATABASE_URL: database.url, TOKEN_ENCRYPTION_KEY: TEST_KEY } : {}),
  };
  /** The stored row and the key that decrypts it, read once the CLI has exited. */
  const stored = async () => {
    const db = database ?? openDatabase({ dataDir: join(env.DATA_DIR!, 'pgdata') });
    try {
      const key = database ? Buffer.from(TEST_KEY, 'base64') : Buffer.from(readFileSync(join(env.DATA_DIR!, 'token-encryption.key'), 'utf8').trim(), 'base64');
      return { row: await getTokenRow(db.db, 'acme'), cipher: new TokenCipher(key) };
    } finally {
      await db.close();
    }
  };
  return { env, stored, close: async () => database?.close() };
}

function run(args: string[], env: Record<string, string>) {
  const child = spawn(process.execPath, crmBridge(...args), { env, stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const lines = createInterface({ input: child.stdout! });
  const output: string[] = [];
  const waiters: Array<{ match: RegExp; resolve: (line: string) => void }> = [];
  lines.on('line', (line) => {
    output.push(line);
    for (const w of [...waiters]) if (w.match.test(line)) waiters.splice(waiters.indexOf(w), 1) && w.resolve(line);
  });
  const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
  return {
    child,
    exited,
    output: () => output.join('\n'),
    stderr: () => stderr,
    line: (match: RegExp) => new Promise<string>((resolve) => {
      const found = output.find((l) => match.test(l));
      if (found !== undefined) resolve(found);
      else waiters.push({ match, resolve });
    }),
  };
}

describe('crm-bridge auth', () => {
  it('--help explains the flow and its options', async () => {
    const help = run(['auth', '--help'], { PATH: process.env.PATH ?? '' });
    expect(await help.exited).toBe(0);
    for (const option of ['<connection>', '--port', '--redirect-uri', '--no-listen', '--timeout']) expect(help.output()).toContain(option);
  });

  it('prints the consent URL, receives the redirect on a local port, and stores the tokens encrypted', async () => {
    const { env, stored } = await setup();
    const auth = run(['auth', 'acme'], env);
    const url = (await auth.line(/^\s+http.*\/oauth\/authorize\?/)).trim();
    expect(new URL(url).searchParams.get('redirect_uri')).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/oauth\/acme\/callback$/);

    // The browser: the sandbox approves and redirects to the CLI's listener.
    const landed = await fetch(url);
    expect(landed.status).toBe(200);
    expect(await landed.text()).toContain('Connected');
    expect(await auth.exited).toBe(0);
    expect(auth.output()).toContain('"acme" is authorised');
    expect(auth.output()).toContain('claimed an access-token lifetime of 604800 s');

    const { row, cipher } = await stored();
    expect(row?.state).toBe('ok');
    const token = cipher.decrypt(row!.accessTokenEnc!, 'crm-bridge/token/acme/access');
    expect(auth.output()).not.toContain(token);
    const since = sb.state.requestLog.lastSeq;
    expect((await fetch(`${sb.url}/api/v4/matters.json`, { headers: { authorization: `Bearer ${token}` } })).status).toBe(200);
    expect(apiRequests(sb, since).map((r) => r.auth.state)).toEqual(['valid']);
  });

  it('with --no-listen, takes the redirected URL pasted on stdin', async () => {
    const { env, stored } = await setup();
    const auth = run(['auth', 'acme', '--no-listen', '--redirect-uri', 'https://bridge.example.com/oauth/acme/callback'], env);
    const url = (await auth.line(/^\s+http.*\/oauth\/authorize\?/)).trim();
    const consent = await fetch(url, { redirect: 'manual' });
    auth.child.stdin!.write(`${consent.headers.get('location')}\n`);
    expect(await auth.exited).toBe(0);
    expect((await stored()).row?.state).toBe('ok');
  });

  it('refuses an unknown connection or one without the authorization-code grant as a usage error (exit status 2), as the other commands do', async () => {
    const { env, close } = await setup();
    try {
      const unknown = run(['auth', 'nope'], env);
      expect(await unknown.exited).toBe(2);
      expect(unknown.stderr()).toContain('no connection "nope"');
      const plain = run(['auth', 'plain'], env);
      expect(await plain.exited).toBe(2);
      expect(plain.stderr()).toContain('uses auth type none');
    } finally {
      await close();
    }
  });
});
