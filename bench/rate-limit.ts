// Rate-limit budget (issue 8 item 6): a backfill through the real poller against the sandbox
// with its rate limit on, for exactly two windows from the first API call; the sandbox's request
// log says how many calls were made and how many were answered 429.
import type { BenchContext, CaseResult } from './cases.js';
import { peersScript, sandboxConnection, syncScript } from './backfill.js';
import { createBenchDatabase, fmt, startChild } from './child.js';

/**
 * Clio's 50 requests/min, scaled to 25 per 30 s (the same rate) so that two whole windows fit in
 * a one-minute run. Enough records that the backfill never finishes inside the run.
 */
const LIMIT = 25;
const WINDOW_SECONDS = 30;
const WINDOWS = 2;
const MATTERS = 20_000;
const TARGET = 0.95;

interface Entry {
  at: number;
  status: number;
  fault: string | null;
}

export async function runRateLimitBench(context: BenchContext): Promise<CaseResult> {
  const sandbox = await startChild(peersScript, ['sandbox', String(MATTERS)]);
  const pg = await createBenchDatabase(context.postgresUrl);
  try {
    await sandbox.ask({ type: 'switches', switches: { rateLimit: { limit: LIMIT, windowSeconds: WINDOW_SECONDS } } });
    const { lastSeq } = await sandbox.ask<{ lastSeq: number }>({ type: 'lastSeq' });
    const runMs = WINDOWS * WINDOW_SECONDS * 1000;
    const bridge = await startChild(syncScript, ['bridge'], { BENCH_DATABASE_URL: pg.url, BENCH_LOG_LEVEL: context.logLevel, BENCH_CONNECTION: JSON.stringify(sandboxConnection(sandbox.url!)) }, { built: true });
    let report: { status: string; pages: number; records: number };
    try {
      // Aborted a little after the measured span; only calls inside the span are counted.
      ({ report } = await bridge.ask<{ report: typeof report }>({ type: 'poll', warmId: 200_000_001, abortAfterMs: runMs + 1_500 }, runMs + 60_000));
    } finally {
      await bridge.stop();
    }
    const { entries } = await sandbox.ask<{ entries: Entry[] }>({ type: 'requests', since: lastSeq });
    if (entries.length === 0) throw new Error('the backfill made no API call');
    const t0 = entries[0]!.at;
    const inSpan = entries.filter((e) => e.at < t0 + runMs);
    const limited = entries.filter((e) => e.status === 429).length;
    const allowed = LIMIT * WINDOWS;
    const used = inSpan.filter((e) => e.status !== 429).length;
    const fraction = used / allowed;
    const perWindow = Array.from({ length: WINDOWS }, (_, w) => inSpan.filter((e) => e.at >= t0 + w * WINDOW_SECONDS * 1000 && e.at < t0 + (w + 1) * WINDOW_SECONDS * 1000).length);
    const gaps = inSpan.slice(1).map((e, i) => e.at - inSpan[i]!.at);
    context.log(`  ${used} of ${allowed} allowed calls in ${WINDOWS * WINDOW_SECONDS} s (${perWindow.join(' + ')}), ${limited} × 429`);
    return {
      figures: [
        { name: 'rate-limit budget used', value: `${fraction.toFixed(2)} (${used} of ${allowed} calls in ${WINDOWS * WINDOW_SECONDS} s)`, target: `≥ ${TARGET}`, pass: fraction >= TARGET },
        { name: 'rate-limit 429s received', value: String(limited), target: '0', pass: limited === 0 },
      ],
      details: [
        `sandbox rate limit ${LIMIT} calls per ${WINDOW_SECONDS} s per token (Clio's 50/min at the same rate, window scaled down so ${WINDOWS} windows fit in ${WINDOWS * WINDOW_SECONDS} s); X-RateLimit-Reset in whole unix seconds (rounded up), as Clio sends it; the sandbox's window starts at the first call after the previous one ended`,
        `a backfill of ${fmt(MATTERS)} matters (page size 200, \`clio\` preset) through pollStream on Postgres, counted from its first API call for ${WINDOWS * WINDOW_SECONDS} s: calls per ${WINDOW_SECONDS} s from then ${perWindow.join(', ')}; allowed ${LIMIT} × ${WINDOWS}; 429s ${limited} (whole run, ${entries.length} calls)`,
        `the run: ${report.pages} pages, ${fmt(report.records)} records before it was stopped (${report.status}); gaps between calls: min ${fmt(Math.min(...gaps))} ms, max ${fmt(Math.max(...gaps))} ms`,
      ],
    };
  } finally {
    await pg.drop();
    await sandbox.stop();
  }
}
