import { describe, expect, it } from 'vitest';
import { runSandboxCommand } from '../../src/sandbox/index.js';

describe('crm-bridge sandbox command', () => {
  it('prints where it listens and the default client, serves, and stops when told', async () => {
    const lines: string[] = [];
    const stop = new AbortController();
    const done = runSandboxCommand({ port: 0, seed: 42, records: 20, print: (l) => lines.push(l), signal: stop.signal });
    while (!lines.some((l) => l.startsWith('  control API'))) await new Promise((r) => setTimeout(r, 10));
    const url = /listening on (http:\/\/\S+)/.exec(lines[0] ?? '')?.[1] ?? '';
    expect(lines.join('\n')).toContain('client_id=sandbox-client client_secret=sandbox-secret');
    expect(lines.join('\n')).toContain(`${url}/_sandbox/`);
    const status = await (await fetch(`${url}/_sandbox/`)).json() as { counts: { matters: number; contacts: number } };
    expect(status.counts).toMatchObject({ matters: 10, contacts: 10 });
    stop.abort();
    await done;
    expect(lines.at(-1)).toBe('sandbox CRM shutting down');
    await expect(fetch(`${url}/_sandbox/`)).rejects.toThrow();
  });
});
