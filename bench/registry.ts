import type { BenchCase } from './cases.js';
import { runIngestBench } from './ingest.js';

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
    ].join('\n'),
    targets: ['ingest/postgres new ratio ≥ 0.5'],
    run: runIngestBench,
  },
  {
    id: 'backfill',
    title: 'Backfill',
    description:
      '100,000 records from the sandbox (faults off, page size 200) through the poller into ledger and outbox, divided by a bare loop that fetches the same pages and discards them; peak RSS. On Postgres and PGlite.',
    targets: ['backfill ratio ≤ 1.3', 'peak RSS ≤ 200 MB'],
  },
  {
    id: 'repoll',
    title: 'Re-poll',
    description: 'The same 100,000 records again, all unchanged, divided by the bare fetch.',
    targets: ['re-poll ratio ≤ 1.1'],
  },
  {
    id: 'delivery',
    title: 'Delivery',
    description: '50,000 outbox rows to a local sink, divided by a bare loop POSTing the same bodies with the same concurrency.',
    targets: ['delivery ratio ≥ 0.7'],
  },
  {
    id: 'e2e-latency',
    title: 'End-to-end latency',
    description: 'Hook received to sink received, at 200 changes/s: p50 and p99.',
    targets: ['p99 ≤ 50 ms'],
  },
  {
    id: 'rate-limit',
    title: 'Rate-limit budget',
    description: 'A backfill against the sandbox at 50 requests/min: fraction of the allowed requests used, and 429s received.',
    targets: ['budget used ≥ 0.95', '0 × 429'],
  },
];
