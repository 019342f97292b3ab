import type { FastifyBaseLogger } from 'fastify';
import type { Db } from '../db/client.js';
import { acquireLease, releaseLease, renewLease } from '../db/queries/leases.js';
import { pruneBodiesBatch, pruneOutboundWritesBatch } from '../db/queries/retention.js';
import { Daemon } from './daemon.js';

/** Held while a prune runs: one at a time, CLI or daemon. */
export const RETENTION_LEASE = 'retention';
/**
 * Taken by a replica's daily tick and left to expire: while it is held, the other replicas (and
 * a restarted one) skip their ticks, so the fleet prunes about once a day, not once per replica.
 */
const DAILY_LEASE = 'retention:daily';
const DAY_MS = 86_400_000;
/** A batch is a short DELETE (and UPDATE); the lease outlives many of them. */
const LEASE_MS = 10 * 60_000;

export interface RetentionOptions {
  db: Db;
  retentionDays: number;
  /** This replica's name in the lease row. */
  owner: string;
  /** The clock the retention age is measured from (tests move it instead of editing history). */
  now?: Date;
  batchSize?: number;
  signal?: AbortSignal;
}

export interface RetentionReport {
  /** `busy`: another replica holds the lease (or pruned recently). */
  status: 'ok' | 'busy' | 'stopped';
  pruned: number;
  /** Settled outbound writes whose fields and echo_match were cleared. */
  outboundWrites: number;
  batches: number;
  cutoff: string;
}

/**
 * Deletes the bodies of changes received more than `retentionDays` ago, batch by batch, except
 * those whose delivery is pending or dead (DESIGN "Retention"), and clears the fields and
 * echo_match of the outbound writes the pipeline asked for as long ago, except those pending
 * or not settled (they still need them). One replica at a time, through the `retention` lease,
 * renewed between batches; a replica that lost it stops.
 */
export async function pruneExpiredBodies(options: RetentionOptions): Promise<RetentionReport> {
  const now = options.now ?? new Date();
  const cutoff = new Date(now.getTime() - options.retentionDays * DAY_MS);
  const report: RetentionReport = { status: 'ok', pruned: 0, outboundWrites: 0, batches: 0, cutoff: cutoff.toISOString() };
  if (!(await acquireLease(options.db, RETENTION_LEASE, options.owner, LEASE_MS))) return { ...report, status: 'busy' };
  const limit = options.batchSize ?? 1_000;
  // Each batch takes up to `limit` of each kind; a kind with a short batch is done.
  let bodies = true;
  let writes = true;
  for (;;) {
    if (options.signal?.aborted) return { ...report, status: 'stopped' };
    if (bodies) {
      const pruned = await pruneBodiesBatch(options.db, { cutoff, limit });
      report.pruned += pruned.length;
      bodies = pruned.length === limit;
    }
    if (writes) {
      const cleared = await pruneOutboundWritesBatch(options.db, { cutoff, limit });
      report.outboundWrites += cleared.length;
      writes = cleared.length === limit;
    }
    report.batches++;
    if (!bodies && !writes) break;
    if (!(await renewLease(options.db, RETENTION_LEASE, options.owner, LEASE_MS))) return { ...report, status: 'busy' };
  }
  await releaseLease(options.db, RETENTION_LEASE, options.owner);
  return report;
}

/** Runs the prune once a day on every replica; the lease makes it one run a day in all. */
export class RetentionDaemon extends Daemon {
  constructor(private readonly deps: { db: Db; retentionDays: number; owner: string; log: FastifyBaseLogger }) {
    super({ name: 'retention', intervalMs: DAY_MS, jitter: 0.05, log: deps.log });
  }

  async tick(signal: AbortSignal): Promise<void> {
    const started = performance.now();
    if (!(await acquireLease(this.deps.db, DAILY_LEASE, this.deps.owner, DAY_MS * 0.9))) return;
    const report = await pruneExpiredBodies({ ...this.deps, signal });
    if (report.status !== 'ok') return;
    const ms = Math.round(performance.now() - started);
    this.deps.log[report.pruned + report.outboundWrites > 0 ? 'info' : 'debug'](
      { pruned: report.pruned, outboundWrites: report.outboundWrites, batches: report.batches, cutoff: report.cutoff, ms },
      `retention: ${prunedText(report)}`,
    );
  }
}

/** `crm-bridge prune`: one run now. Exit status 0 done, 1 another replica is pruning. */
export async function pruneFromCli(db: Db, options: { retentionDays: number; owner: string }, write: (text: string) => void): Promise<number> {
  const report = await pruneExpiredBodies({ db, ...options });
  if (report.status === 'busy') {
    write('another prune is running: nothing done\n');
    return 1;
  }
  write(`${prunedText(report)} (kept: pending and dead deliveries, writes not yet made or not yet echoed)\n`);
  return 0;
}

/** What a prune did, for the daemon's log line and the CLI. */
function prunedText(report: RetentionReport): string {
  return `pruned ${report.pruned} body(ies) of changes received before ${report.cutoff} and the fields of ${report.outboundWrites} pipeline write(s) asked for before then`;
}
