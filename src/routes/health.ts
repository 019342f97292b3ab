import type { FastifyInstance } from 'fastify';
import { sql } from 'drizzle-orm';
import { rowsOf, withTimeout } from '../db/client.js';
import { getAuthStates, getDeliveryStats, getLastHookAt, type StoredAuth } from '../db/queries/health.js';
import { getOutboundStats } from '../db/queries/outbound.js';
import { countPendingFetches, listStreamCursors, type PendingFetchCounts, type StreamCursor } from '../db/queries/streams.js';
import type { Connection } from '../plugins/config.js';
import { errorClass } from '../privacy.js';
import { authSchema, pollObjects } from '../config/schema.js';

const DB_CHECK_TIMEOUT_MS = 2_000;

/**
 * `GET /health` is what operators curl and load balancers poll: states, timestamps and counts
 * only, never client data. 503 when the database is unreachable or a connection needs
 * (re-)authorisation, when a connection's oldest undelivered change is older than its
 * `downstream.degradedAfter`, when a poll goes stale, and when a sweep held deletes for an operator.
 */
export default async function healthRoutes(app: FastifyInstance) {
  // A stream the poller has not run yet (no cursor row) is judged from the start, not from never.
  const startedAt = performance.now();
  app.get('/health/live', { schema: liveSchema }, async () => ({ status: 'ok' }));

  app.get('/health', { schema: healthSchema }, async (_request, reply) => {
    const { code, body } = await healthReport(app, startedAt);
    return reply.code(code).send(body);
  });
}

/**
 * The /health answer as data, for the route, the status page and `crm-bridge status`.
 * `startedAt` (a `performance.now()`): streams the poller has not run yet (no cursor row) are
 * judged stale from then, measured back from the database's clock by this process's uptime, so a
 * replica's wrong wall clock cannot make them stale or fresh.
 */
export async function healthReport(app: FastifyInstance, startedAt: number) {
  const started = performance.now();
  // The database's clock: run times and queue ages are written by it (markStreamAttempt).
  let dbNow = Date.now();
  try {
    const [row] = await rowsOf<{ now: string | Date }>(withTimeout(app.db.execute(sql`select now() as now`), DB_CHECK_TIMEOUT_MS));
    dbNow = new Date(row!.now).getTime();
  } catch (err) {
    app.log.warn({ err }, 'health: database check failed');
    return {
      code: 503 as const,
      body: {
        status: 'down' as const,
        checks: { db: { status: 'down' as const, error: errorClass(err) } },
        connections: [...app.connections.keys()].map((id) => ({ id })),
      },
    };
  }
  const latencyMs = Math.round(performance.now() - started);
  const { connections } = await buildReport(app, dbNow - (performance.now() - startedAt), dbNow);
  const healthy = connections.every((c) => c.auth.state !== 'needs_reauth' && !c.delivery.degraded && !c.poll?.stale && !c.poll?.heldDeletes);
  return {
    code: healthy ? (200 as const) : (503 as const),
    body: { status: healthy ? ('ok' as const) : ('degraded' as const), checks: { db: { status: 'ok' as const, latencyMs } }, connections },
  };
}

async function buildReport(app: FastifyInstance, startedAt: number, now: number) {
  const [delivery, auth, cursors, outbound, fetches] = await Promise.all([
    getDeliveryStats(app.db),
    getAuthStates(app.db),
    listStreamCursors(app.db),
    getOutboundStats(app.db),
    countPendingFetches(app.db),
  ]);
  const connections = await Promise.all(
    [...app.connections.values()].map(async (c) => {
      const stored = await getLastHookAt(app.db, c.id);
      const local = app.hookActivity.get(c.id) ?? null;
      const lastReceivedAt = latest(stored, local);
      const d = delivery.get(c.id);
      const oldestPendingAgeMs = d?.oldestPendingAt ? Math.max(0, now - d.oldestPendingAt.getTime()) : null;
      // Age, not count: a burst of thousands draining fast is fine; one change stuck for an hour is not.
      const degradedAfter = c.downstream?.degradedAfter;
      return {
        id: c.id,
        auth: authReport(c, auth.get(c.id)),
        hooks: { lastReceivedAt: lastReceivedAt?.toISOString() ?? null },
        delivery: {
          pending: d?.pending ?? 0,
          oldestPendingAgeSeconds: oldestPendingAgeMs === null ? null : Math.round(oldestPendingAgeMs / 1000),
          deadLetters: d?.deadLetters ?? 0,
          degraded: oldestPendingAgeMs !== null && degradedAfter !== undefined && oldestPendingAgeMs > degradedAfter,
        },
        ...pollReport(c, cursors, fetches, now, startedAt),
        // Pipeline writes not yet made, and those the CRM refused for good (see GET /v1/connections/:id/records/:outboundId).
        ...(c.outbound ? { outbound: { pending: outbound.get(c.id)?.pending ?? 0, failed: outbound.get(c.id)?.failed ?? 0 } } : {}),
      };
    }),
  );
  return { connections };
}

/**
 * The stored auth state. With no row yet, an authorization-code connection has never been
 * authorised and can neither poll nor write until an operator does it; client credentials and
 * static tokens need no operator and get their row on first use.
 */
function authReport(connection: Connection, stored: StoredAuth | undefined) {
  // The type says how to re-authorise (reauthHint): `crm-bridge status --url` has no configuration to look it up in.
  const type = connection.auth.type;
  if (stored) return { type, state: stored.state, expiresAt: stored.expiresAt?.toISOString() ?? null };
  if (type === 'oauth2') return { type, state: 'needs_reauth' as const, expiresAt: null, reason: 'never_authorised' as const };
  return { type, state: 'none' as const, expiresAt: null };
}

/** Per stream: last attempt, last success, last error (a class and status only), stale. */
function pollReport(connection: Connection, cursors: StreamCursor[], fetches: PendingFetchCounts, now: number, startedAt: number) {
  const objects = pollObjects(connection);
  if (objects.length === 0) return {};
  const interval = connection.poll?.interval ?? 300_000;
  const staleAfter = connection.poll?.staleAfter ?? 3 * interval;
  const streams = objects.map((object) => {
    const cursor = cursors.find((row) => row.connectionId === connection.id && row.object === object);
    // A stream that never succeeded is stale staleAfter from its first run (its row's
    // created_at; rows older than the column count from the upgrade), not from this process's
    // start: a restart, or `crm-bridge status` building the app just now, must not make a poll
    // that has failed since it was set up look fresh again (a bridge restarting every few
    // minutes would never be stale). Only a stream with no row, never run, is judged from the
    // start; the CLI cannot know the server's start, so there it has no age until a first run.
    const since = cursor?.lastSuccessAt?.getTime() ?? cursor?.createdAt.getTime() ?? startedAt;
    return {
      object,
      lastSuccessAt: iso(cursor?.lastSuccessAt),
      lastAttemptAt: iso(cursor?.lastAttemptAt),
      // Trimmed again when shown: a row written before errors were stored as classes keeps its text.
      lastError: cursor?.lastError ? errorClass(cursor.lastError) : null,
      lastSweepAt: iso(cursor?.lastSweepAt),
      // Deletes the last sweep found and did not make (vouchForDeletes): an operator decides.
      sweepHeld: cursor?.sweepHeld ?? null,
      cursor: cursor?.cursorUpdatedAt ?? null,
      caughtByPoll: cursor?.caughtByPoll ?? 0,
      stale: now - since > staleAfter,
      // Notified records not fetched yet, and those the CRM refused when last asked (a 403 on one record).
      ...(connection.inbound.payload === 'notification' ? { notifications: notificationsOf(fetches, connection.id, object) } : {}),
    };
  });
  const oldest = streams.reduce<string | null>((min, s) => (s.lastSuccessAt === null || (min !== null && min < s.lastSuccessAt) ? min : s.lastSuccessAt), null);
  return {
    poll: {
      lastSuccessAt: streams.some((s) => s.lastSuccessAt === null) ? null : oldest,
      lastAttemptAt: streams.map((s) => s.lastAttemptAt).reduce<string | null>((max, t) => (t !== null && (max === null || t > max) ? t : max), null),
      lastError: streams.find((s) => s.lastError !== null)?.lastError ?? null,
      stale: streams.some((s) => s.stale),
      heldDeletes: streams.reduce((sum, s) => sum + (s.sweepHeld?.deletes ?? 0), 0),
      staleAfterSeconds: Math.round(staleAfter / 1000),
      streams,
    },
    caughtByPoll: streams.reduce((sum, s) => sum + s.caughtByPoll, 0),
  };
}

function notificationsOf(fetches: PendingFetchCounts, connectionId: string, object: string) {
  const row = fetches.find((f) => f.connectionId === connectionId && f.object === object);
  return { waiting: row?.waiting ?? 0, failing: row?.failing ?? 0 };
}

function iso(d: Date | null | undefined): string | null {
  return d ? d.toISOString() : null;
}

function latest(a: Date | null, b: Date | null): Date | null {
  if (a === null) return b;
  if (b === null) return a;
  return a > b ? a : b;
}

const nullableTime = { type: ['string', 'null'], format: 'date-time' } as const;
const nullableString = { type: ['string', 'null'] } as const;

// additionalProperties stays open: a field added to the report later is sent, not silently
// stripped by the serializer, while the fields listed here are documented and typed.
const streamSchema = {
  type: 'object',
  additionalProperties: true,
  properties: {
    object: { type: 'string' },
    lastSuccessAt: nullableTime,
    lastAttemptAt: nullableTime,
    lastError: nullableString,
    lastSweepAt: { ...nullableTime, description: 'When the listing of the last completed sweep began: records deleted in the CRM before it have been found.' },
    sweepHeld: {
      type: ['object', 'null'],
      description:
        "Deletes the last sweep found and did not make, for an operator: over_limit (more records vanished at once than poll.sweepDeleteLimit allows; `crm-bridge sweep <connection> --allow-deletes` makes them) or listing_incomplete (records the listing left out were still in the CRM). Null when the last sweep made every delete it found.",
      properties: {
        reason: { type: 'string', enum: ['over_limit', 'listing_incomplete'] },
        deletes: { type: 'integer' },
        records: { type: 'integer' },
        at: { type: 'string', format: 'date-time' },
      },
    },
    cursor: nullableString,
    caughtByPoll: { type: 'integer' },
    stale: { type: 'boolean' },
    notifications: {
      type: 'object',
      description: 'Notification hooks only: notified records not fetched yet, and those the CRM refused when last asked (each is tried again every run).',
      properties: { waiting: { type: 'integer' }, failing: { type: 'integer' } },
    },
  },
} as const;

const connectionReportSchema = {
  type: 'object',
  additionalProperties: true,
  required: ['id'],
  properties: {
    id: { type: 'string' },
    auth: {
      type: 'object',
      additionalProperties: true,
      properties: {
        type: { type: 'string', enum: authSchema.options.map((o) => o.shape.type.value), description: "The connection's auth type, which decides how it is re-authorised" },
        state: { type: 'string', enum: ['ok', 'needs_reauth', 'none'], description: 'none: the connection sends no credential, or has not fetched its first token' },
        expiresAt: nullableTime,
        reason: { type: 'string', enum: ['never_authorised'], description: 'Only with needs_reauth for an OAuth2 connection no one has authorised yet' },
      },
    },
    hooks: { type: 'object', additionalProperties: true, properties: { lastReceivedAt: nullableTime } },
    delivery: {
      type: 'object',
      additionalProperties: true,
      properties: {
        pending: { type: 'integer' },
        oldestPendingAgeSeconds: { type: ['integer', 'null'] },
        deadLetters: { type: 'integer' },
        degraded: { type: 'boolean' },
      },
    },
    poll: {
      type: 'object',
      additionalProperties: true,
      description: 'Only for connections that poll.',
      properties: {
        lastSuccessAt: nullableTime,
        lastAttemptAt: nullableTime,
        lastError: { ...nullableString, description: 'An error class and status, never record content.' },
        stale: { type: 'boolean' },
        heldDeletes: { type: 'integer', description: "Deletes the streams' last sweeps held (see streams[].sweepHeld); more than 0 makes /health 503." },
        staleAfterSeconds: { type: 'integer' },
        streams: { type: 'array', items: streamSchema },
      },
    },
    outbound: {
      type: 'object',
      additionalProperties: true,
      description: 'Only for connections that take pipeline writes.',
      properties: { pending: { type: 'integer' }, failed: { type: 'integer' } },
    },
    caughtByPoll: { type: 'integer', description: 'Changes the poll found that no hook had announced: the automation miss count.' },
  },
} as const;

const healthBodySchema = {
  type: 'object',
  additionalProperties: true,
  required: ['status', 'checks', 'connections'],
  properties: {
    status: { type: 'string', enum: ['ok', 'degraded', 'down'] },
    checks: {
      type: 'object',
      additionalProperties: true,
      properties: {
        db: {
          type: 'object',
          additionalProperties: true,
          properties: { status: { type: 'string', enum: ['ok', 'down'] }, latencyMs: { type: 'integer' }, error: { type: 'string' } },
        },
      },
    },
    connections: { type: 'array', items: connectionReportSchema },
  },
} as const;

const healthSchema = {
  summary: 'Per connection: auth state, last poll and hook, delivery backlog; 503 when anything needs attention',
  tags: ['health'],
  response: { 200: healthBodySchema, 503: healthBodySchema },
} as const;

const liveSchema = {
  summary: 'Liveness probe: the process answers',
  tags: ['health'],
  response: { 200: { type: 'object', properties: { status: { type: 'string', const: 'ok' } }, required: ['status'] } },
} as const;
