import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import { sql } from 'drizzle-orm';
import { pollObjects } from '../config/schema.js';
import { withTimeout } from '../db/client.js';
import { getDeliveryStats } from '../db/queries/health.js';
import { listStreamCursors } from '../db/queries/streams.js';

/**
 * Prometheus metrics, one registry per app (tests build many apps in one process, and a shared
 * global registry would mix their counts). Labels are connection, object, source, disposition,
 * kind and outcome only: never a record id, name or anything else a client could be found by,
 * and never an unauthenticated caller's input (an unknown hook connection is `unknown`).
 *
 * Counters count what this process did; the gauges read the database on scrape, so every
 * replica reports the same outbox depth and poll lag.
 */
export interface BridgeMetrics {
  registry: Registry;
  changes: Counter<'connection' | 'object' | 'source' | 'disposition'>;
  deliveries: Counter<'connection' | 'outcome'>;
  pollDuration: Histogram<'connection' | 'object' | 'kind' | 'status'>;
  tokenRefreshes: Counter<'connection' | 'outcome'>;
  hookAuthFailures: Counter<'connection'>;
}

declare module 'fastify' {
  interface FastifyInstance {
    metrics: BridgeMetrics;
  }
}

/** How long a scrape waits for each database read (as long as /health's database check). */
const DB_READ_TIMEOUT_MS = 2_000;

export const TOKEN_REFRESH_OUTCOMES = ['refreshed', 'needs_reauth', 'rejected', 'unavailable'] as const;
export type TokenRefreshOutcome = (typeof TOKEN_REFRESH_OUTCOMES)[number];
export type DeliveryOutcome = 'delivered' | 'retry' | 'dead';

export default fp(
  async (app: FastifyInstance) => {
    const registry = new Registry();
    collectDefaultMetrics({ register: registry });
    const registers = [registry];

    const metrics: BridgeMetrics = {
      registry,
      changes: new Counter({
        name: 'crm_bridge_changes_total',
        help: 'Changes observed, by where they came from (hook, poll, sweep, notification, outbound) and what the gate decided',
        labelNames: ['connection', 'object', 'source', 'disposition'],
        registers,
      }),
      deliveries: new Counter({
        name: 'crm_bridge_deliveries_total',
        help: 'Delivery attempts to the intake pipeline by outcome (delivered, retry, dead)',
        labelNames: ['connection', 'outcome'],
        registers,
      }),
      pollDuration: new Histogram({
        name: 'crm_bridge_poll_duration_seconds',
        help: 'Duration of poll and sweep runs (kind) by result (ok, failed, busy)',
        labelNames: ['connection', 'object', 'kind', 'status'],
        buckets: [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900],
        registers,
      }),
      tokenRefreshes: new Counter({
        name: 'crm_bridge_token_refreshes_total',
        help: 'Token refreshes by outcome (refreshed; failures: needs_reauth, rejected, unavailable)',
        labelNames: ['connection', 'outcome'],
        registers,
      }),
      hookAuthFailures: new Counter({
        name: 'crm_bridge_hook_auth_failures_total',
        help: 'Hook requests refused for a missing or wrong secret (connection "unknown" for a connection that does not exist)',
        labelNames: ['connection'],
        registers,
      }),
    };

    // A scrape reads the gauges below from the database, each bounded as /health's check is. One
    // that fails (the database down or slow) is left out of the answer rather than failing it:
    // the counters and process metrics are still served, and crm_bridge_database_up says why.
    const read = <T>(query: () => Promise<T>): Promise<T | undefined> => withTimeout(query(), DB_READ_TIMEOUT_MS).catch(() => undefined);
    new Gauge({
      name: 'crm_bridge_database_up',
      help: '1 when the database answered a bounded query during this scrape; 0 when it did not, and the gauges read from it are left out',
      registers,
      async collect() {
        this.set((await read(() => app.db.execute(sql`select 1`))) === undefined ? 0 : 1);
      },
    });

    const known = () => [...app.connections.keys()];
    new Gauge({
      name: 'crm_bridge_outbox_depth',
      help: 'Outbox rows waiting (pending) or given up on (dead), read from the database on scrape',
      labelNames: ['connection', 'state'],
      registers,
      async collect() {
        const stats = await read(() => getDeliveryStats(app.db));
        this.reset();
        if (stats === undefined) return;
        for (const connection of known()) {
          const s = stats.get(connection);
          this.set({ connection, state: 'pending' }, s?.pending ?? 0);
          this.set({ connection, state: 'dead' }, s?.deadLetters ?? 0);
        }
      },
    });

    // One scrape reads the cursors once for the three stream gauges.
    let cursors: Promise<Awaited<ReturnType<typeof listStreamCursors>> | undefined> | undefined;
    const streamRows = () => (cursors ??= read(() => listStreamCursors(app.db)).finally(() => setTimeout(() => (cursors = undefined), 0)));
    const streamGauge = (name: string, help: string, value: (row: Awaited<ReturnType<typeof listStreamCursors>>[number], now: number) => number | null) =>
      new Gauge({
        name,
        help,
        labelNames: ['connection', 'object'],
        registers,
        async collect() {
          const rows = await streamRows();
          const now = Date.now();
          this.reset();
          if (rows === undefined) return;
          for (const row of rows) {
            // Only the streams the poller runs: a backfill keeps its checkpoint in a cursor row of
            // its own (`matters#backfill`), years behind while it re-reads old records.
            const connection = app.connections.get(row.connectionId);
            if (connection === undefined || !pollObjects(connection).includes(row.object)) continue;
            const v = value(row, now);
            if (v !== null) this.set({ connection: row.connectionId, object: row.object }, v);
          }
        },
      });
    streamGauge('crm_bridge_poll_lag_seconds', 'How far the poll cursor is behind now (the CRM time of the newest change read)', (row, now) =>
      row.cursorRank === null ? null : Math.max(0, (now - row.cursorRank) / 1000),
    );
    // A stream that has never succeeded counts from its first run, as /health judges it stale: left
    // out, a poll failing since the day it was set up (wrong credentials) would never be alerted on.
    streamGauge('crm_bridge_poll_last_success_age_seconds', 'Seconds since the stream last polled successfully (since its first run when it never has)', (row, now) =>
      Math.max(0, (now - (row.lastSuccessAt ?? row.createdAt).getTime()) / 1000),
    );
    streamGauge('crm_bridge_caught_by_poll', 'Changes the poll delivered that no hook had announced (the automation misses; alert on its rate)', (row) => row.caughtByPoll);
    streamGauge('crm_bridge_sweep_held_deletes', 'Deletes the last sweep found and held for an operator (alert when above 0; /health poll.streams[].sweepHeld says why)', (row) => row.sweepHeld?.deletes ?? 0);

    app.decorate('metrics', metrics);
  },
  { name: 'metrics', dependencies: ['config', 'db'] },
);

/** A finished poll or sweep run: its duration, and its changes by disposition (source poll/sweep). */
export function recordRun(metrics: BridgeMetrics, report: { connectionId: string; object: string; kind: 'poll' | 'sweep'; status: string; counts: Record<string, number> }, seconds: number): void {
  metrics.pollDuration.observe({ connection: report.connectionId, object: report.object, kind: report.kind, status: report.status }, seconds);
  for (const [disposition, n] of Object.entries(report.counts)) {
    if (n > 0) metrics.changes.inc({ connection: report.connectionId, object: report.object, source: report.kind, disposition }, n);
  }
}
