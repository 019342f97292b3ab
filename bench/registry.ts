import { runBackfillBench, runRepollBench } from './backfill.js';
import type { BenchCase } from './cases.js';
import { runDeliveryBench } from './delivery.js';
import { runIngestBench } from './ingest.js';
import { runLatencyBench } from './latency.js';
import { runRateLimitBench } from './rate-limit.js';

/**
 * Every figure `npm run bench` reports, in the order of issue 8. To fill a slot: add `run`,
 * returning its figures (each a ratio against a baseline measured in the same run), and a
 * description of how it is measured.
 */
export const benchCases: BenchCase[] = [
  {
    id: 'ingest',
    title: 'Hook ingest (Postgres and embedded PGlite)',
    description: [
      'autocannon (in the bench process) drives `POST /hooks/:connection` of the real app (`buildApp`,',
      'in a child process, logging at info to /dev/null) at 50 connections with a ~1 KB record body.',
      'The "new" runs give every request a new record id, so each one is a new change through the',
      'gate (head row, ledger row, body row, outbox row); the "duplicate" runs send one body again',
      'and again (all but the first are 200 duplicate). The baseline is a bare Fastify handler in a',
      'child process that parses the same bodies and answers 202, driven the same way in the same',
      'run. After each run the ledger is counted and every eventId answered with a 202 must have a',
      'committed ledger row and an outbox row (every 202 durable). Postgres runs use a fresh',
      'throwaway database, dropped afterwards; PGlite runs use a fresh data directory on disk.',
      'During the measured "new" run on Postgres, and the baseline\'s, the CPU time of the server',
      'process, its Postgres backends (from /proc, when Postgres runs on this machine) and autocannon',
      'is divided by the requests served: what a hook costs, and how many per second the cores could',
      'serve at most at that cost.',
    ].join('\n'),
    targets: ['ingest/postgres new ratio ≥ 0.5'],
    run: runIngestBench,
  },
  {
    id: 'backfill',
    title: 'Backfill',
    description:
      '100,000 sandbox matters (faults off, page size 200, `clio` preset) through `pollStream` into ledger and outbox, in a bridge child process (peak RSS is its own), divided by a bare loop in another child that fetches the same pages with plain fetch and discards them, before and after (mean). The sandbox runs in a third process. PGlite beside it with 10,000 matters (BENCH_PGLITE_RECORDS), against its own bare loop.',
    targets: ['backfill ratio ≤ 1.3', 'peak RSS ≤ 200 MB'],
    run: runBackfillBench,
  },
  {
    id: 'repoll',
    title: 'Re-poll',
    description: 'The same records again in the same bridge process, under a cursor key of its own (so everything is re-read, as `crm-bridge backfill` does), all unchanged, divided by the same bare fetch. Measured together with the backfill.',
    targets: ['re-poll ratio ≤ 1.1'],
    run: runRepollBench,
  },
  {
    id: 'delivery',
    title: 'Delivery',
    description:
      'Outbox rows (50,000, the issue\'s count; BENCH_DELIVERY_ROWS for a shorter run) delivered by `DeliveryWorker` ticks at the default concurrency 4 to a bare Fastify sink answering 202 (its own process), divided by a bare loop in another process POSTing the same ~1 KB bodies at the same concurrency, before and after (mean).',
    targets: ['delivery ratio ≥ 0.7'],
    run: runDeliveryBench,
  },
  {
    id: 'e2e-latency',
    title: 'End-to-end latency',
    description:
      'Hooks sent open-loop at 200/s for 20 s from the bench process to the app (own process, daemons started, downstream as shipped: a committed hook wakes the worker; Postgres); the sink (own process) notes its receipt − the bridge\'s receipt of the hook (the body\'s observedAt), and − the send time carried in each record. Absolute, with the load average beside it, and beside it too a bare INSERT + COMMIT at the same rate on the same database (10 s before the app, 10 s after): what a durable commit costs at that rate with nothing else running.',
    targets: ['p99 ≤ 50 ms'],
    run: runLatencyBench,
  },
  {
    id: 'rate-limit',
    title: 'Rate-limit budget',
    description:
      'A backfill through `pollStream` against the sandbox with its rate limit at 25 calls per 30 s (Clio\'s 50/min, window scaled down), for two windows from the first API call: calls made ÷ calls allowed, and 429s, from the sandbox request log.',
    targets: ['budget used ≥ 0.95', '0 × 429'],
    run: runRateLimitBench,
  },
];
