import type { FastifyInstance } from 'fastify';
import { DEFAULT_CLIENT, startSandbox, type Sandbox, type SandboxOptions } from '../../src/sandbox/index.js';
import type { Database } from '../../src/db/client.js';
import { buildTestApp, SECRET } from './app.js';

export const TEST_TOKEN_KEY = Buffer.alloc(32, 7).toString('base64');

/** A connection to the sandbox CRM with the `clio` preset, as an operator would configure it. */
export function clioConnection(sandbox: Sandbox, overrides: Record<string, unknown> = {}) {
  const { poll, inbound, ...rest } = overrides as { poll?: Record<string, unknown>; inbound?: Record<string, unknown> };
  return {
    id: 'firm',
    connector: 'clio',
    baseUrl: sandbox.url,
    auth: { type: 'client_credentials', clientId: DEFAULT_CLIENT.clientId, clientSecret: DEFAULT_CLIENT.clientSecret, tokenUrl: '/oauth/token' },
    inbound: { secrets: [SECRET], recordPath: 'data', object: 'matters', ...inbound },
    // Ticks are driven by the tests; the interval only matters for staleness.
    poll: { objects: ['matters'], interval: '1h', lookback: '2m', pageSize: 50, lease: '10s', ...poll },
    ...rest,
  };
}

/**
 * The bridge (listening on a real port, so the sandbox's automation can call its hook) and the
 * sandbox CRM, wired together.
 */
export async function startBridge(options: {
  database: Database;
  sandbox?: SandboxOptions;
  connection?: Record<string, unknown>;
  env?: Record<string, string>;
  automation?: { dropRate?: number; duplicateRate?: number; delayMs?: number; payload?: 'record' | 'notification'; events?: Array<'created' | 'updated' | 'deleted'> };
}): Promise<{ app: FastifyInstance; sandbox: Sandbox; base: string; close(): Promise<void> }> {
  const sandbox = await startSandbox({ records: 100, ...options.sandbox });
  const app = await buildTestApp({
    database: options.database,
    connections: [clioConnection(sandbox, options.connection)],
    env: { TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY, ...options.env },
  });
  const base = await app.listen({ port: 0, host: '127.0.0.1' });
  if (options.automation) {
    sandbox.state.addAutomationRule({
      object: 'matters',
      events: options.automation.events ?? ['created', 'updated', 'deleted'],
      url: `${base}/hooks/firm?object=matters`,
      auth: { type: 'bearer', value: SECRET },
      payload: options.automation.payload ?? 'record',
      dropRate: options.automation.dropRate ?? 0,
      duplicateRate: options.automation.duplicateRate ?? 0,
      delayMs: options.automation.delayMs ?? 0,
    });
  }
  return {
    app,
    sandbox,
    base,
    close: async () => {
      await app.close();
      await sandbox.close();
    },
  };
}

/**
 * The clio preset's matters, listed in updated_at order with offset paging (the sandbox serves
 * that too), as HubSpot's search pages: a backfill or poll checkpoints every page.
 */
export const timeOrderedConnector = {
  objects: {
    matters: {
      idPath: 'id',
      updatedAtPath: 'updated_at',
      versionPath: 'etag',
      volatile: ['etag'],
      fields: { displayNumber: 'display_number', status: 'status' },
      list: {
        request: {
          path: '/api/v4/matters.json',
          query: { fields: 'id,etag,display_number,status,updated_at', order: 'updated_at(asc)', limit: '{{limit}}', offset: '{{offset}}', updated_since: '{{since}}' },
        },
        records: 'data',
        pagination: { style: 'offset', totalPath: 'meta.records' },
        order: 'updatedAt',
      },
    },
  },
};
