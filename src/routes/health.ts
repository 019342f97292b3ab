import type { FastifyInstance } from 'fastify';
import { sql } from 'drizzle-orm';
import { getAuthStates, getDeliveryStats, getLastHookAt } from '../db/queries/health.js';
import { listStreamCursors, type StreamCursor } from '../db/queries/streams.js';
import type { Connection } from '../plugins/config.js';
import { pollObjects } from '../sync/poller.js';

const DB_CHECK_TIMEOUT_MS = 2_000;

/**
 * `GET /health` is what operators curl and load balancers poll: states, timestamps and counts
 * only, never client data. 503 when the database is unreachable or a connection needs
 * re-authorisation, when a connection's oldest undelivered change is older than its
 * `downstream.degradedAfter` (and, as the poller lands, when a poll goes stale).
 */
export default async function healthRoutes(app: FastifyInstance) {
  // A stream that has not succeeded since start is judged from the start, not from never.
  const startedAt = Date.now();
  app.get('/health/live', async () => ({ status: 'ok' }));

  app.get('/health', async (_request, reply) => {
    const started = performance.now();
    try {
      await withTimeout(app.db.execute(sql`select 1`), DB_CHECK_TIMEOUT_MS);
    } catch (err) {
      app.log.warn({ err }, 'health: database check failed');
      return reply.code(503).send({
        status: 'down',
        checks: { db: { status: 'down', error: (err as { code?: string }).code ?? (err as Error).name } },
        connections: [...app.connections.keys()].map((id) => ({ id })),
      });
    }
    const latencyMs = Math.round(performance.now() - started);
    const { connections } = await buildReport(app, startedAt);
    const healthy = connections.every((c) => c.auth.state !== 'needs_reauth' && !c.delivery.degraded && !c.poll?.stale);
    return reply.code(healthy ? 200 : 503).send({
      status: healthy ? 'ok' : 'degraded',
      checks: { db: { status: 'ok', latencyMs } },
      connections,
    });
  });
}

async function buildReport(app: FastifyInstance, startedAt: number) {
  const [delivery, auth, cursors] = await Promise.all([getDeliveryStats(app.db), getAuthStates(app.db), listStreamCursors(app.db)]);
  const now = Date.now();
  const connections = await Promise.all(
    [...app.connections.values()].map(async (c) => {
      const stored = await getLastHookAt(app.db, c.id);
      const local = app.hookActivity.get(c.id) ?? null;
      const lastReceivedAt = latest(stored, local);
      const d = delivery.get(c.id);
      const a = auth.get(c.id);
      const oldestPendingAgeMs = d?.oldestPendingAt ? Math.max(0, now - d.oldestPendingAt.getTime()) : null;
      // Age, not count: a burst of thousands draining fast is fine; one change stuck for an hour is not.
      const degradedAfter = c.downstream?.degradedAfter;
      return {
        id: c.id,
        auth: a ? { state: a.state, expiresAt: a.expiresAt?.toISOString() ?? null } : { state: 'none' as const, expiresAt: null },
        hooks: { lastReceivedAt: lastReceivedAt?.toISOString() ?? null },
        delivery: {
          pending: d?.pending ?? 0,
          oldestPendingAgeSeconds: oldestPendingAgeMs === null ? null : Math.round(oldestPendingAgeMs / 1000),
          deadLetters: d?.deadLetters ?? 0,
          degraded: oldestPendingAgeMs !== null && degradedAfter !== undefined && oldestPendingAgeMs > degradedAfter,
        },
        ...pollReport(c, cursors, now, startedAt),
      };
    }),
  );
  return { connections };
}

/** Per stream: last attempt, last success, last error (a class and status only), stale. */
function pollReport(connection: Connection, cursors: StreamCursor[], now: number, startedAt: number) {
  const objects = pollObjects(connection);
  if (objects.length === 0) return {};
  const interval = connection.poll?.interval ?? 300_000;
  const staleAfter = connection.poll?.staleAfter ?? 3 * interval;
  const streams = objects.map((object) => {
    const cursor = cursors.find((row) => row.connectionId === connection.id && row.object === object);
    const lastSuccess = cursor?.lastSuccessAt?.getTime() ?? null;
    return {
      object,
      lastSuccessAt: iso(cursor?.lastSuccessAt),
      lastAttemptAt: iso(cursor?.lastAttemptAt),
      lastError: cursor?.lastError ?? null,
      lastSweepAt: iso(cursor?.lastSweepAt),
      cursor: cursor?.cursorUpdatedAt ?? null,
      caughtByPoll: cursor?.caughtByPoll ?? 0,
      stale: now - (lastSuccess ?? startedAt) > staleAfter,
    };
  });
  const oldest = streams.reduce<string | null>((min, s) => (s.lastSuccessAt === null || (min !== null && min < s.lastSuccessAt) ? min : s.lastSuccessAt), null);
  return {
    poll: {
      lastSuccessAt: streams.some((s) => s.lastSuccessAt === null) ? null : oldest,
      lastAttemptAt: streams.map((s) => s.lastAttemptAt).reduce<string | null>((max, t) => (t !== null && (max === null || t > max) ? t : max), null),
      lastError: streams.find((s) => s.lastError !== null)?.lastError ?? null,
      stale: streams.some((s) => s.stale),
      staleAfterSeconds: Math.round(staleAfter / 1000),
      streams,
    },
    caughtByPoll: streams.reduce((sum, s) => sum + s.caughtByPoll, 0),
  };
}

function iso(d: Date | null | undefined): string | null {
  return d ? d.toISOString() : null;
}

function latest(a: Date | null, b: Date | null): Date | null {
  if (a === null) return b;
  if (b === null) return a;
  return a > b ? a : b;
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(Object.assign(new Error('database check timed out'), { name: 'TimeoutError', code: 'TIMEOUT' })), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
