import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, loadEnv } from '../src/config/load.js';
import { connectorForConnection } from '../src/crm/connector.js';

const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-config-'));
function file(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

function problemsOf(fn: () => unknown): string[] {
  try {
    fn();
  } catch (err) {
    if (err instanceof ConfigError) return err.problems;
    throw err;
  }
  throw new Error('expected a ConfigError');
}

const goodYaml = `
connections:
  - id: acme-law
    connector:
      objects:
        matters: { idPath: id, updatedAtPath: updated_at, fields: { area: practice_area.name } }
    inbound:
      header: X-Bridge-Secret
      secrets: ["\${HOOK_SECRET}", "\${HOOK_SECRET_PREVIOUS}"]
`;

describe('configuration', () => {
  it('reads a YAML connections file with ${ENV} secrets', () => {
    const config = loadConfig({
      CRM_BRIDGE_CONFIG: file('good.yaml', goodYaml),
      HOOK_SECRET: 'new-secret-0123456789',
      HOOK_SECRET_PREVIOUS: 'old-secret-0123456789',
    });
    expect(config.connections[0]).toMatchObject({
      id: 'acme-law',
      inbound: { header: 'x-bridge-secret', secrets: ['new-secret-0123456789', 'old-secret-0123456789'], payload: 'record', bodyLimit: 1048576 },
    });
    expect(config.env).toMatchObject({ PORT: 3000, DATA_DIR: '.data', LOG_LEVEL: 'info' });
  });

  it('reads the same file as JSON', () => {
    const json = JSON.stringify({ connections: [{ id: 'j', connector: { objects: { leads: {} } }, inbound: { secrets: ['0123456789abcdef'] } }] });
    expect(loadConfig({ CRM_BRIDGE_CONFIG: file('c.json', json) }).connections[0]?.connector.objects.leads?.idPath).toBe('id');
  });

  it('names every bad value and where it is, in one error', () => {
    const bad = file(
      'bad.yaml',
      `
connections:
  - id: Acme Law
    connector: { objects: { matters: { idPath: "a..b" } } }
    inbound:
      secrets: ["short", "\${MISSING_SECRET}"]
      payload: webhook
      object: invoices
    surprise: true
  - id: dup
    connector: nosuchpreset
    inbound: { secrets: ["0123456789abcdef"] }
`,
    );
    const problems = problemsOf(() => loadConfig({ CRM_BRIDGE_CONFIG: bad, PORT: 'eighty', DATABASE_URL: 'mysql://x', LOG_LEVEL: 'loud', TRUST_PROXY: '2' }));
    const text = problems.join('\n');
    expect(text).toMatch(/environment variable PORT/);
    expect(text).toMatch(/environment variable TRUST_PROXY: must be true, or addresses or CIDRs/);
    expect(text).toMatch(/environment variable DATABASE_URL: must be a postgres/);
    expect(text).toMatch(/environment variable LOG_LEVEL/);
    expect(text).toMatch(/connections\[0\]\.id: must be lowercase/);
    expect(text).toMatch(/connections\[0\]\.connector\.objects\.matters\.idPath: must be a dotted path/);
    expect(text).toMatch(/connections\[0\]\.inbound\.secrets\[0\]: a hook secret must be at least 16 characters/);
    expect(text).toMatch(/connections\[0\]\.inbound\.secrets\[1\]: environment variable MISSING_SECRET is not set/);
    expect(text).toMatch(/connections\[0\]\.inbound\.payload/);
    expect(text).toMatch(/connections\[0\]: Unrecognized key: "surprise"/i);
    expect(text).toMatch(/connections\[1\]\.connector: unknown preset "nosuchpreset"/);
    expect(text).toContain(bad);
    expect(problems.length).toBeGreaterThanOrEqual(10);
  });

  it('reports a missing file and unparseable YAML clearly', () => {
    expect(problemsOf(() => loadConfig({ CRM_BRIDGE_CONFIG: join(dir, 'nope.yaml') })).join()).toMatch(/nope\.yaml: file not found/);
    expect(problemsOf(() => loadConfig({ CRM_BRIDGE_CONFIG: file('broken.yaml', 'connections: [\n  - id: x\n    : :') })).join()).toMatch(/broken\.yaml/);
  });

  it('answers a connector named like a property every object has (constructor, toString) as an unknown preset, not a DataCloneError', () => {
    for (const name of ['constructor', 'toString']) {
      const conn = { id: 'a', connector: name, inbound: { secrets: ['0123456789abcdef'] } };
      expect(problemsOf(() => loadConfig({ CRM_BRIDGE_CONFIG: file('proto.json', JSON.stringify({ connections: [conn] })) })).join()).toMatch(
        new RegExp(`connections\\[0\\]\\.connector: unknown preset "${name}" \\(known: clio, hubspot\\)`),
      );
    }
  });

  it('refuses duplicate connection ids and an inbound object the connector lacks', () => {
    const conn = { connector: { objects: { matters: {} } }, inbound: { secrets: ['0123456789abcdef'], object: 'contacts' } };
    const text = problemsOf(() => loadConfig({ CRM_BRIDGE_CONFIG: file('dup.json', JSON.stringify({ connections: [{ id: 'a', ...conn }, { id: 'a', ...conn }] })) })).join('\n');
    expect(text).toMatch(/duplicate connection id "a"/);
    expect(text).toMatch(/"contacts" is not an object of this connector/);
  });

  it('refuses notification hooks whose records nothing would fetch: an object that is not polled, or has no get call', () => {
    const clio = { connector: 'clio', baseUrl: 'https://app.clio.com', auth: { type: 'static', token: 'a-static-token-0123' } };
    const notified = (extra: Record<string, unknown>) => ({ id: 'n', ...clio, inbound: { secrets: ['0123456789abcdef'], payload: 'notification', object: 'matters' }, ...extra });
    const problems = (conn: unknown) => problemsOf(() => loadConfig({ CRM_BRIDGE_CONFIG: file('notify.json', JSON.stringify({ connections: [conn] })) })).join('\n');
    expect(problems(notified({}))).toMatch(/connections\[0\]\.inbound\.payload: notifications carry only an id, but "matters" is not polled/);
    expect(problems(notified({ poll: { objects: ['contacts'] } }))).toMatch(/"matters" is not polled/);
    const noGet = { id: 'n', connector: { objects: { matters: { idPath: 'id' } } }, inbound: { secrets: ['0123456789abcdef'], payload: 'notification' } };
    expect(problems(noGet)).toMatch(/"matters" has no get call in this connector/);
    // Polled, with the preset's get call: accepted.
    expect(loadConfig({ CRM_BRIDGE_CONFIG: file('notify-ok.json', JSON.stringify({ connections: [notified({ poll: { objects: ['matters'] } })] })) }).connections).toHaveLength(1);
  });

  // docker-compose.yml builds DATABASE_URL from POSTGRES_PASSWORD as it is; `openssl rand -base64`
  // makes a `/` in most such passwords, and postgres.js then failed with "Invalid URL" (exit 1).
  it('refuses a DATABASE_URL whose password postgres.js would misread (an unencoded / ? # or %), naming the variable and not the password', () => {
    for (const password of ['Kq3/x+Zr7w', 'Kq3?xZr7w', 'Kq3#xZr7w', 'Kq3%zzZr7w']) {
      const text = problemsOf(() => loadEnv({ DATABASE_URL: `postgres://crm_bridge:${password}@postgres:5432/crm_bridge` })).join('\n');
      expect(text).toMatch(/environment variable DATABASE_URL: must be a postgres:\/\/ or postgresql:\/\/ URL, with any \/ \? # % @ in the password percent-encoded/);
      expect(text).not.toContain('Kq3');
    }
    expect(problemsOf(() => loadEnv({ DATABASE_URL: 'postgres://u:p@db.internal:99999/x' })).join()).toMatch(/DATABASE_URL/);
    for (const url of ['postgres://crm_bridge:Kq3%2Fx+Zr7w@postgres:5432/crm_bridge', 'postgresql://u:p@ss:w@h1:5432,h2:5433/db?sslmode=require', 'postgres://postgres@127.0.0.1:5432/test']) {
      expect(loadEnv({ DATABASE_URL: url }).DATABASE_URL).toBe(url);
    }
  });

  it('accepts a 32-byte base64 TOKEN_ENCRYPTION_KEY and refuses another length', () => {
    const conns = { connections: [] as unknown[] };
    conns.connections.push({ id: 'a', connector: { objects: { m: {} } }, inbound: { secrets: ['0123456789abcdef'] } });
    expect(() => loadConfig({ TOKEN_ENCRYPTION_KEY: Buffer.alloc(32, 1).toString('base64') }, conns)).not.toThrow();
    expect(problemsOf(() => loadConfig({ TOKEN_ENCRYPTION_KEY: 'abc' }, conns)).join()).toMatch(/TOKEN_ENCRYPTION_KEY: must be 32 bytes/);
  });

  it('refuses an ADMIN_TOKEN, METRICS_TOKEN or pipeline API key with a space in it, which no Authorization: Bearer header can carry', () => {
    const passphrase = 'correct horse battery staple';
    const conns = { connections: [{ id: 'a', connector: { objects: { m: {} } }, inbound: { secrets: ['0123456789abcdef'] }, outbound: { apiKeys: ['pipeline-key-0123456789', passphrase] } }] };
    const text = problemsOf(() => loadConfig({ ADMIN_TOKEN: passphrase, METRICS_TOKEN: `metrics ${passphrase}` }, conns)).join('\n');
    expect(text).toMatch(/environment variable ADMIN_TOKEN: must not contain spaces/);
    expect(text).toMatch(/environment variable METRICS_TOKEN: must not contain spaces/);
    expect(text).toMatch(/connections\[0\]\.outbound\.apiKeys\[1\]: a pipeline API key must not contain spaces/);
    // Trailing whitespace (a file's newline) is trimmed, as before.
    const good = { connections: [{ ...conns.connections[0]!, outbound: { apiKeys: ['pipeline-key-0123456789\n'] } }] };
    expect(loadConfig({ ADMIN_TOKEN: 'admin-token-0123456789\n', METRICS_TOKEN: ' metrics-token-0123456789' }, good).env).toMatchObject({ ADMIN_TOKEN: 'admin-token-0123456789', METRICS_TOKEN: 'metrics-token-0123456789' });
  });

  it('reads a duration given as text without a unit as seconds, as an environment variable or a ${VAR} reference gives it, and still refuses "5x"', () => {
    const conns = (poll: Record<string, unknown>) => ({
      connections: [{ id: 'a', connector: 'clio', baseUrl: 'http://127.0.0.1:9', auth: { type: 'static', token: 'static-token' }, inbound: { secrets: ['0123456789abcdef'] }, poll }],
    });
    const config = loadConfig({ AUTH_FAILURE_WINDOW: '600', POLL_SECONDS: '300' }, conns({ interval: '${POLL_SECONDS}', lookback: '1.5' }));
    expect(config.env.AUTH_FAILURE_WINDOW).toBe(600_000);
    expect(config.connections[0]!.poll).toMatchObject({ interval: 300_000, lookback: 1_500 });
    expect(problemsOf(() => loadConfig({}, conns({ interval: '5x' }))).join('\n')).toMatch(/connections\[0\]\.poll\.interval: "5x" is not a duration/);
  });

  it('refuses a wait longer than a timer can hold (about 24.8 days), naming the key, and takes a sweep interval longer than that', () => {
    const conns = (extra: Record<string, unknown>) => ({
      connections: [{ id: 'a', connector: 'clio', baseUrl: 'http://127.0.0.1:9', auth: { type: 'static', token: 'static-token' }, inbound: { secrets: ['0123456789abcdef'] }, ...extra }],
    });
    const text = problemsOf(() => loadConfig({}, conns({ poll: { interval: '30d' }, downstream: { url: 'http://127.0.0.1:9/in', timeout: '25d' } }))).join('\n');
    expect(text).toMatch(/connections\[0\]\.poll\.interval: must be at most 24 days/);
    expect(text).toMatch(/connections\[0\]\.downstream\.timeout: must be at most 24 days/);
    expect(loadConfig({}, conns({ poll: { interval: '24d', sweepInterval: '90d' } })).connections[0]!.poll).toMatchObject({ interval: 24 * 86_400_000, sweepInterval: 90 * 86_400_000 });
  });

  it('refuses a poll interval, timeout, claim pause or lease of 0 (sweepInterval: 0 is the one that turns something off), naming the key', () => {
    // `interval: 0`, written as sweepInterval's 0 would be, polled the CRM without pause and kept /health at 503 (staleAfter 0).
    const path = file(
      'zero-waits.yaml',
      `
connections:
  - id: a
    connector: clio
    baseUrl: http://127.0.0.1:9
    inbound: { secrets: ["0123456789abcdef"] }
    poll: { interval: "\${POLL_INTERVAL}", lease: 0s, sweepInterval: 0 }
    downstream: { url: http://127.0.0.1:9/in, timeout: 0ms, pollInterval: 0 }
    outbound: { apiKeys: ["pipeline-key-0123456789"], lease: 0, pollInterval: 0 }
`,
    );
    const text = problemsOf(() => loadConfig({ CRM_BRIDGE_CONFIG: path, POLL_INTERVAL: '0' })).join('\n');
    expect(text).toMatch(/connections\[0\]\.poll\.interval: must be more than 0: the poller would call the CRM without pause/);
    for (const key of ['poll.lease', 'downstream.timeout', 'downstream.pollInterval', 'outbound.lease', 'outbound.pollInterval']) {
      expect(text).toContain(`connections[0].${key}: must be more than 0`);
    }
    expect(text).not.toMatch(/sweepInterval/);
  });

  it('refuses a hook secret with a space when it is sent as a Bearer token, and takes it in a header of its own', () => {
    const conns = (inbound: Record<string, unknown>) => ({ connections: [{ id: 'a', connector: { objects: { m: {} } }, inbound }] });
    const text = problemsOf(() => loadConfig({}, conns({ secrets: ['0123456789abcdef', 'correct horse battery staple'] }))).join('\n');
    expect(text).toMatch(/connections\[0\]\.inbound\.secrets: a hook secret sent as Authorization: Bearer <secret> must not contain spaces/);
    expect(loadConfig({}, conns({ secrets: ['correct horse battery staple'], header: 'X-Hook-Secret' })).connections[0]!.inbound.secrets).toEqual(['correct horse battery staple']);
  });
  it('takes writeAs in a custom connector from a YAML file, and its toRecord writes the field through the template', () => {
    const path = file(
      'write-as.yaml',
      `
connections:
  - id: firm
    connector:
      objects:
        people:
          fields: { name: full_name, email: primary_email }
          writeAs:
            email: { emails: [{ kind: work, address: "{{value}}", primary: true }] }
          create: { request: { method: POST, path: /people } }
    inbound: { secrets: ["0123456789abcdef"] }
`,
    );
    const connection = loadConfig({ CRM_BRIDGE_CONFIG: path }).connections[0]!;
    expect(connection.connector.objects.people!.writeAs).toEqual({ email: { emails: [{ kind: 'work', address: '{{value}}', primary: true }] } });
    const connector = connectorForConnection({ ...connection, baseUrl: 'http://127.0.0.1:9' });
    expect(connector.toRecord('people', { name: 'Ada', email: 'ada@example.com' })).toEqual({ full_name: 'Ada', emails: [{ kind: 'work', address: 'ada@example.com', primary: true }] });
  });

  it('refuses a writeAs entry that could never write its field, naming the entry and why', () => {
    const people = (object: Record<string, unknown>) => ({ connections: [{ id: 'a', connector: { objects: { people: object } }, inbound: { secrets: ['0123456789abcdef'] } }] });
    const fields = { name: 'full_name', email: 'primary_email', phone: 'primary_phone' };
    const text = problemsOf(() =>
      loadConfig(
        {},
        people({
          fields,
          readOnly: ['phone'],
          writeAs: {
            emial: { emails: [{ address: '{{value}}' }] },
            phone: { phones: [{ number: '{{value}}' }] },
            name: { names: [{ text: 'fixed' }] },
            email: { emails: [{ address: '{{since}}' }] },
          },
        }),
      ),
    ).join('\n');
    expect(text).toMatch(/connections\[0\]\.connector\.objects\.people\.writeAs\.emial: "emial" is not a field of this object \(its fields: name, email, phone\)/);
    expect(text).toMatch(/writeAs\.phone: "phone" is also listed in readOnly, and a read-only field is never written/);
    expect(text).toMatch(/writeAs\.name: must use \{\{value\}\} where the field's value goes/);
    expect(text).toMatch(/writeAs\.email: a writeAs template has only \{\{value\}\}, not \{\{since\}\}/);
    expect(problemsOf(() => loadConfig({}, people({ fields, writeAs: { email: '{{value}}' } }))).join()).toMatch(/writeAs\.email: must be an object merged into the record written/);
    expect(problemsOf(() => loadConfig({}, people({ writeAs: { email: { emails: ['{{value}}'] } } }))).join()).toMatch(/writeAs\.email: writeAs needs a field map \(fields\)/);
  });
});
