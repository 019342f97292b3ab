import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config/load.js';
import type { ConnectionConfig } from '../../src/config/schema.js';
import { TokenCipher } from '../../src/crm/crypto.js';
import { formatProbeReport, probeConnection } from '../../src/crm/probe.js';
import type { ProbeOptions } from '../../src/crm/probe.js';
import { presets } from '../../src/crm/presets/index.js';
import { createTokenManager } from '../../src/crm/token-manager.js';
import { getTokenRow } from '../../src/db/queries/tokens.js';
import { startSandbox } from '../../src/sandbox/index.js';
import type { Sandbox } from '../../src/sandbox/index.js';
import { crmBridge } from '../helpers/cli.js';
import { createTestDatabase } from '../helpers/database.js';
import { startFaultProxy } from '../helpers/fault-proxy.js';

const SECRET = 'probe-hook-secret-0123456789';

describe('crm-bridge probe against the sandbox, lies switched on', () => {
  let sb: Sandbox;
  let database: Awaited<ReturnType<typeof createTestDatabase>>;
  const cipher = new TokenCipher(randomBytes(32));
  let n = 0;

  beforeAll(async () => {
    sb = await startSandbox({ records: 40 });
    database = await createTestDatabase();
    // The first matter gets a practice area, so the nested-object lie is on the record probed.
    const first = sb.state.store.matters.items[0];
    sb.state.updateRecord('matters', first?.id ?? 0, { practice_area: { id: sb.state.store.practiceAreas.items[0]?.id } });
  });
  beforeEach(() => sb.state.resetSwitches());
  afterAll(async () => {
    await sb.close();
    await database.close();
  });

  /** A connection as an operator writes it, authenticated by client_credentials through the real token manager. */
  function connectionOf(connector: unknown, extra: Record<string, unknown> = {}): ConnectionConfig {
    const id = `probe-${++n}`;
    const config = loadConfig(
      { LOG_LEVEL: 'silent', DATA_DIR: 'memory://' },
      {
        connections: [
          {
            id,
            connector,
            baseUrl: sb.url,
            inbound: { secrets: [SECRET] },
            auth: { type: 'client_credentials', clientId: 'sandbox-client', clientSecret: 'sandbox-secret', tokenUrl: `${sb.url}/oauth/token` },
            ...extra,
          },
        ],
      },
    );
    return config.connections[0] as ConnectionConfig;
  }

  function probeOptions(connection: ConnectionConfig, object = 'matters'): ProbeOptions {
    const tokens = createTokenManager(database.db, connection, { cipher });
    return {
      connection,
      object,
      tokens,
      http: { retryBaseMs: 1 },
      tokenLifetime: async () => {
        const row = await getTokenRow(database.db, connection.id);
        return row ? { claimedLifetimeSeconds: row.claimedLifetimeSeconds, expiresAt: row.expiresAt } : null;
      },
    };
  }

  it('passes the clio preset, lists unmapped fields and reports the lifetime the token endpoint claimed', async () => {
    sb.state.setSwitches({ advertisedExpiresInSeconds: 3600 });
    const report = await probeConnection(probeOptions(connectionOf('clio')));
    expect(report.mismatch).toBe(false);
    expect(report.host).toEqual({ url: sb.url, status: 'answers' });
    expect((report.record as { id: number }).id).toBe(sb.state.store.matters.items[0]?.id);
    expect(report.token?.claimedLifetimeSeconds).toBe(3600);
    const unmapped = report.findings.filter((f) => f.kind === 'unmapped').map((f) => f.path);
    expect(unmapped).toContain('number');
    expect(unmapped).not.toContain('etag');
    const text = formatProbeReport(report);
    expect(text).toContain('claimed a lifetime of 3600 s (1 hours)');
    expect(text).toContain('result: the record matches the definition');
  });

  it('finds an object where the docs promised a string, and suggests practice_area.name; a missing path is a mismatch too', async () => {
    const docsSay = structuredClone(presets.clio) as { objects: Record<string, Record<string, unknown>> };
    const matters = docsSay.objects.matters as { fields: Record<string, string>; fieldTypes: Record<string, string> };
    matters.fields = { ...matters.fields, practiceArea: 'practice_area', matterName: 'name' };
    const report = await probeConnection(probeOptions(connectionOf(docsSay)));
    expect(report.mismatch).toBe(true);
    expect(report.findings).toContainEqual(expect.objectContaining({ kind: 'type', field: 'practiceArea', path: 'practice_area', expected: 'string', found: 'an object', suggestion: 'practice_area.name' }));
    expect(report.findings).toContainEqual(expect.objectContaining({ kind: 'missing', field: 'matterName', path: 'name', mismatch: true }));
    expect(formatProbeReport(report)).toContain('MISMATCH practiceArea: string expected at practice_area, an object found; use practice_area.name');
  });

  it('when the documented host answers with an HTML page, names the known regional hosts that answer instead', async () => {
    sb.state.setSwitches({ documentedHostBroken: true });
    const nowhere = 'http://127.0.0.1:9';
    const connector = { ...structuredClone(presets.clio), regionalHosts: [sb.documentedUrl, nowhere, sb.url] };
    const report = await probeConnection(probeOptions(connectionOf(connector, { baseUrl: sb.documentedUrl })));
    expect(report.mismatch).toBe(true);
    expect(report.host.status).toBe('fails');
    expect(report.host.detail).toContain('HTML page');
    expect(report.alternatives).toEqual([
      expect.objectContaining({ url: nowhere, status: 'fails' }),
      { url: sb.url, status: 'answers' },
    ]);
    // The rest of the check still runs on the record the working host gave.
    expect(report.record).not.toBeNull();
    expect(formatProbeReport(report)).toContain(`set the connection's baseUrl to ${sb.url}`);
  });

  it('when the configured host redirects every call to another host, says so and names the host that answers', async () => {
    // A legacy host (app.goclio.com) or an http:// base URL: every call is sent on to the real host.
    const legacy = await startFaultProxy({ fail: (req) => ({ status: 301, headers: { location: `${sb.url}${req.url}` } }) });
    try {
      const connector = { ...structuredClone(presets.clio), regionalHosts: [legacy.url, sb.url] };
      const report = await probeConnection(probeOptions(connectionOf(connector, { baseUrl: legacy.url })));
      expect(report.host.status).toBe('fails');
      expect(report.host.detail).toContain(`redirects to ${sb.url}/api/v4/matters.json`);
      expect(report.alternatives).toEqual([{ url: sb.url, status: 'answers' }]);
    } finally {
      await legacy.close();
    }
  });

  it('authenticates with an OAuth client id and secret read with a trailing newline (a secret mounted from a file), as the token endpoint knows them', async () => {
    const config = loadConfig(
      { LOG_LEVEL: 'silent', DATA_DIR: 'memory://', CLIO_CLIENT_ID: 'sandbox-client\n', CLIO_CLIENT_SECRET: 'sandbox-secret\n' },
      {
        connections: [
          {
            id: `probe-${++n}`,
            connector: 'clio',
            baseUrl: sb.url,
            inbound: { secrets: [SECRET] },
            auth: { type: 'client_credentials', clientId: '${CLIO_CLIENT_ID}', clientSecret: '${CLIO_CLIENT_SECRET}', tokenUrl: `${sb.url}/oauth/token` },
          },
        ],
      },
    );
    const report = await probeConnection(probeOptions(config.connections[0]!));
    expect(report.host).toEqual({ url: sb.url, status: 'answers' });
    expect(report.mismatch).toBe(false);
  });

  it('says no host answered, not that the list call returned none, when the CRM cannot be reached', async () => {
    // No regional hosts: nothing else is tried (the preset's are real Clio hosts).
    const connection = connectionOf({ ...structuredClone(presets.clio), regionalHosts: [] }, { baseUrl: 'http://127.0.0.1:9', auth: { type: 'none' } });
    const report = await probeConnection({ connection, object: 'matters', http: { retryBaseMs: 1 } });
    expect(report.host.status).toBe('fails');
    const text = formatProbeReport(report);
    expect(text).toContain('no record to check: no host answered');
    expect(text).not.toContain('the list call returned none');
    expect(text).toContain('result: MISMATCH');
  });

  it('the CLI prints the report and exits 1 on a mismatch, 0 when the record matches', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-probe-'));
    try {
      const docsSay = structuredClone(presets.clio) as { objects: { matters: { fields: Record<string, string> } } };
      docsSay.objects.matters.fields.practiceArea = 'practice_area';
      const auth = { type: 'client_credentials', clientId: 'sandbox-client', clientSecret: 'sandbox-secret', tokenUrl: `${sb.url}/oauth/token` };
      const file = join(dir, 'connections.json');
      writeFileSync(
        file,
        JSON.stringify({
          connections: [
            { id: 'lied-to', connector: docsSay, baseUrl: sb.url, inbound: { secrets: [SECRET] }, auth },
            { id: 'honest', connector: 'clio', baseUrl: sb.url, inbound: { secrets: [SECRET] }, auth },
          ],
        }),
      );
      const env: Record<string, string> = {
        PATH: process.env.PATH ?? '',
        CRM_BRIDGE_CONFIG: file,
        DATA_DIR: join(dir, 'data'),
        LOG_LEVEL: 'silent',
        TOKEN_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
        ...(database.url ? { DATABASE_URL: database.url } : {}),
      };
      const run = (connection: string, object = 'matters') =>
        new Promise<{ code: number | null; out: string }>((resolve) => {
          const child = spawn(process.execPath, crmBridge('probe', connection, '--object', object), { env, cwd: process.cwd() });
          let out = '';
          child.stdout.on('data', (d: Buffer) => (out += d.toString()));
          child.stderr.on('data', (d: Buffer) => (out += d.toString()));
          child.on('close', (code) => resolve({ code, out }));
        });
      const lied = await run('lied-to');
      expect(lied.out).toContain('use practice_area.name');
      expect(lied.code).toBe(1);
      const honest = await run('honest');
      expect(honest.out).toContain('result: the record matches the definition');
      expect(honest.code).toBe(0);

      // A mistyped connection or object is a usage error (2), in one line, as poll and backfill answer it: not a mismatch (1), nor an invalid configuration.
      const nope = await run('nope');
      expect(nope.code).toBe(2);
      expect(nope.out.trim()).toBe(`crm-bridge: no connection "nope" in ${file} (known: lied-to, honest)`);
      const object = await run('honest', 'invoices');
      expect(object.code).toBe(2);
      expect(object.out.trim()).toBe('crm-bridge: connection honest has no object "invoices" (it has matters, contacts)');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
