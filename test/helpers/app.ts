import { Writable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { expect } from 'vitest';
import { buildApp } from '../../src/app.js';
import { loadConfig } from '../../src/config/load.js';
import type { Database } from '../../src/db/client.js';
import { loggerOptions } from '../../src/logger.js';

export const SECRET = 'hook-secret-0123456789abcdef';
export const OLD_SECRET = 'old-hook-secret-9876543210fedcba';

/** A connection as an operator would write it in the connections file. */
export function connection(overrides: Record<string, unknown> = {}) {
  const { inbound, ...rest } = overrides as { inbound?: Record<string, unknown> };
  return {
    id: 'acme',
    connector: {
      objects: {
        matters: {
          idPath: 'id',
          updatedAtPath: 'updated_at',
          fields: { name: 'display_number', status: 'status', practiceArea: 'practice_area.name', description: 'description' },
        },
        contacts: { idPath: 'id', updatedAtPath: 'updated_at', volatile: ['etag'] },
      },
    },
    inbound: { secrets: [SECRET], ...inbound },
    ...rest,
  };
}

/** Captures every log line the app writes, so tests can search them for secrets. */
export function captureLogs() {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, done) {
      lines.push(chunk.toString());
      done();
    },
  });
  return { logger: pino({ ...loggerOptions('debug') }, stream), text: () => lines.join('') };
}

export async function buildTestApp(options: {
  database: Database;
  connections?: unknown[];
  env?: Record<string, string>;
  logger?: ReturnType<typeof captureLogs>['logger'];
  startDaemons?: boolean;
}) {
  const config = loadConfig({ LOG_LEVEL: 'silent', DATA_DIR: 'memory://', ...options.env }, { connections: options.connections ?? [connection()] });
  return buildApp({
    config,
    database: options.database,
    loggerInstance: options.logger ?? pino({ level: 'silent' }),
    startDaemons: options.startDaemons ?? false,
  });
}

/** Posts `record` as a hook of connection `acme` and returns its event id; the change must be new (202). */
export async function hookAccepted(app: FastifyInstance, record: Record<string, unknown>): Promise<string> {
  const res = await app.inject({
    method: 'POST',
    url: '/hooks/acme',
    headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
    payload: JSON.stringify(record),
  });
  expect(res.statusCode).toBe(202);
  return (res.json() as { eventId: string }).eventId;
}
