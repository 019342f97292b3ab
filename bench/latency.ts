// End-to-end latency (issue 8 item 5): hooks sent open-loop at a steady rate from this process
// to the real app (its own process, daemons started, on Postgres), delivered by its
// DeliveryWorker to the sink (its own process), which notes each arrival against the send time
// carried in the record and against the bridge's receipt of the hook (the body's observedAt).
// The figure is the interval, hook received to sink received, with the time from the
// send beside it; an absolute figure, as the issue asks, with the load average.
import { Agent, request as httpRequest } from 'node:http';
import { availableParallelism, loadavg } from 'node:os';
import postgres from 'postgres';
import type { BenchContext, CaseResult } from './cases.js';
import { peersScript, syncScript } from './backfill.js';
import { createBenchDatabase, fmt, percentile, startChild } from './child.js';
import { BENCH_CONNECTION_ID, BENCH_HOOK_SECRET, benchMatter } from './sync-shared.js';

const RATE = 200;
const SECONDS = Number(process.env.BENCH_LATENCY_SECONDS ?? 20);
const WARMUP_SECONDS = 2;
/** The bare commit loop's run, before the app and again after it. */
const COMMIT_SECONDS = 10;
const TARGET_P99_MS = 50;
/** How often the sender wakes to send what is due; sends are never held back by earlier answers. */
const TICK_MS = 5;
const now = () => performance.timeOrigin + performance.now();

/** One hook POST over a kept-alive connection; resolves with the status once the answer is read. */
function postHook(agent: Agent, url: URL, body: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const request = httpRequest(
      url,
      { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), authorization: `Bearer ${BENCH_HOOK_SECRET}` } },
      (response) => {
        response.resume();
        response.on('end', () => resolve(response.statusCode ?? 0));
        response.on('error', reject);
      },
    );
    request.on('error', reject);
    request.end(body);
  });
}

/**
 * Calls `send` `rate` times a second for `seconds`, open-loop: a timer sends whatever is due,
 * never waiting for answers. Resolves with the count once every call has settled.
 */
async function openLoop(rate: number, seconds: number, send: (i: number) => Promise<void>): Promise<number> {
  const total = Math.round(rate * seconds);
  const inFlight: Promise<void>[] = [];
  const started = performance.now();
  await new Promise<void>((resolve) => {
    const timer = setInterval(() => {
      const due = Math.min(total, Math.floor(((performance.now() - started) / 1000) * rate) + 1);
      while (inFlight.length < due) inFlight.push(send(inFlight.length));
      if (inFlight.length >= total) {
        clearInterval(timer);
        resolve();
      }
    }, TICK_MS);
  });
  await Promise.all(inFlight);
  return total;
}

/**
 * Sends `rate` hooks per second for `seconds`, open-loop; returns the answers' statuses and times.
 * Through node:http with kept-alive connections rather than fetch: the sender shares the
 * machine's two cores with the bridge, and fetch cost it several times the CPU per request.
 */
async function sendHooks(url: string, rate: number, seconds: number, firstId: number): Promise<{ sent: number; statuses: Map<number, number>; errors: number; answerMs: number[] }> {
  const statuses = new Map<number, number>();
  const answerMs: number[] = [];
  const agent = new Agent({ keepAlive: true, maxSockets: 256 });
  const target = new URL(`${url}/hooks/${BENCH_CONNECTION_ID}`);
  let errors = 0;
  const sent = await openLoop(rate, seconds, (i) => {
    const sentAt = now();
    const body = JSON.stringify({ data: benchMatter(firstId + i, sentAt), meta: { event: 'updated', object: 'matters' } });
    return postHook(agent, target, body).then(
      (status) => {
        answerMs.push(now() - sentAt);
        statuses.set(status, (statuses.get(status) ?? 0) + 1);
      },
      () => void errors++,
    );
  });
  agent.destroy();
  return { sent, statuses, errors, answerMs };
}

/**
 * What durability alone costs at this rate: a bare INSERT of a ~1 KB row and its COMMIT,
 * open-loop at the same rate on the same Postgres, with nothing else running. Every hook's 202
 * waits for such a commit.
 */
async function bareCommits(url: string, rate: number, seconds: number): Promise<number[]> {
  const sql = postgres(url, { max: 4, onnotice: () => {} });
  try {
    await sql`create table if not exists bench_commit (id bigserial primary key, body text not null)`;
    const body = 'x'.repeat(1_000);
    const times: number[] = [];
    await openLoop(rate, seconds, async () => {
      const at = performance.now();
      await sql`insert into bench_commit (body) values (${body})`;
      times.push(performance.now() - at);
    });
    return times;
  } finally {
    await sql.end({ timeout: 5 });
  }
}

export async function runLatencyBench(context: BenchContext): Promise<CaseResult> {
  const sink = await startChild(peersScript, ['sink']);
  const pg = await createBenchDatabase(context.postgresUrl);
  try {
    const connection = {
      connector: 'clio',
      baseUrl: 'http://127.0.0.1:9',
      inbound: { secrets: [BENCH_HOOK_SECRET], recordPath: 'data', object: 'matters' },
      downstream: { url: sink.url },
    };
    const commits = await bareCommits(pg.url, RATE, COMMIT_SECONDS);
    const bridge = await startChild(syncScript, ['bridge'], {
      BENCH_DATABASE_URL: pg.url,
      BENCH_LOG_LEVEL: context.logLevel,
      BENCH_START_DAEMONS: '1',
      BENCH_CONNECTION: JSON.stringify(connection),
    }, { built: true });
    let run: Awaited<ReturnType<typeof sendHooks>>;
    let latencies: number[];
    let sinceReceived: number[];
    let received: number;
    const load: number[][] = [];
    try {
      await sendHooks(bridge.url!, RATE, WARMUP_SECONDS, 400_000_000);
      await new Promise((r) => setTimeout(r, 1_000));
      await sink.ask({ type: 'reset' });
      load.push(loadavg());
      run = await sendHooks(bridge.url!, RATE, SECONDS, 410_000_000);
      // Every delivery of an accepted hook should arrive; give stragglers a moment.
      const deadline = Date.now() + 10_000;
      for (;;) {
        const stats = await sink.ask<{ received: number; latencies: number[]; sinceReceived: number[] }>({ type: 'stats', latencies: true });
        if (stats.received >= run.sent || Date.now() > deadline) {
          latencies = stats.latencies;
          sinceReceived = stats.sinceReceived;
          received = stats.received;
          break;
        }
        await new Promise((r) => setTimeout(r, 200));
      }
      load.push(loadavg());
    } finally {
      await bridge.stop();
    }
    commits.push(...(await bareCommits(pg.url, RATE, COMMIT_SECONDS)));
    commits.sort((a, b) => a - b);
    const commitText = `p50 ${fmt(percentile(commits, 50), 1)}, p99 ${fmt(percentile(commits, 99), 1)}`;
    latencies.sort((a, b) => a - b);
    sinceReceived.sort((a, b) => a - b);
    const received99 = percentile(sinceReceived, 99);
    const receivedText = `p50 ${fmt(percentile(sinceReceived, 50), 1)}, p99 ${fmt(received99, 1)}`;
    const answers = run.answerMs.sort((a, b) => a - b);
    const answerText = `p50 ${fmt(percentile(answers, 50), 1)}, p99 ${fmt(percentile(answers, 99), 1)}`;
    const p50 = percentile(latencies, 50);
    const p99 = percentile(latencies, 99);
    const statusText = [...run.statuses].map(([code, n]) => `${code}×${fmt(n)}`).join(', ') + (run.errors ? `, errors×${run.errors}` : '');
    const loadText = load.map((l) => l.map((x) => x.toFixed(2)).join(' ')).join(' → ');
    context.log(`  latency p50 ${fmt(p50, 1)} ms, p99 ${fmt(p99, 1)} ms over ${fmt(latencies.length)} deliveries from the send; from the bridge's receipt ${receivedText} ms; hook answered ${answerText} ms; bare commit ${commitText} ms (load ${loadText})`);
    return {
      figures: [
        // The interval: hook received (by the bridge) to sink received. The sender's own
        // time and the trip to the bridge are shown beside it, not hidden.
        {
          name: 'e2e/postgres latency p99',
          value: `${fmt(received99, 1)} ms from the bridge's receipt (p50 ${fmt(percentile(sinceReceived, 50), 1)}); from the send p99 ${fmt(p99, 1)}, p50 ${fmt(p50, 1)}; load avg ${load[0]!.map((x) => x.toFixed(1)).join(' ')}`,
          target: `≤ ${TARGET_P99_MS} ms`,
          pass: received99 <= TARGET_P99_MS,
        },
        {
          name: 'e2e/postgres bare commit p99, same rate',
          value: `${fmt(percentile(commits, 99), 1)} ms (p50 ${fmt(percentile(commits, 50), 1)}): an INSERT and COMMIT alone, before and after`,
          target: '—',
          pass: undefined,
        },
        {
          name: 'e2e/postgres every hook delivered',
          value: `${fmt(received)} of ${fmt(run.sent)} (${statusText})`,
          target: 'all',
          pass: received === run.sent && run.errors === 0 && (run.statuses.get(202) ?? 0) === run.sent,
        },
      ],
      details: [
        `${RATE} hooks/s open-loop for ${SECONDS} s (after a ${WARMUP_SECONDS} s warm-up) from the bench process through node:http (kept-alive connections), each a new ~1 KB matter carrying its send time; the app in its own process with daemons started, downstream as shipped (concurrency 4, pollInterval 1 s: a committed hook wakes the worker), on Postgres; the sink in its own process notes receipt − send on the same clock`,
        `hook send to its 202 (ms): ${answerText}; the rest of the latency is the delivery`,
        `a bare INSERT of a ~1 KB row and its COMMIT, open-loop at ${RATE}/s for ${COMMIT_SECONDS} s before the app and ${COMMIT_SECONDS} s after it, on the same database (ms): ${commitText}, max ${fmt(commits.at(-1) ?? NaN, 1)}: what a durable commit costs at this rate with nothing else running (every hook's 202 waits for one)`,
        `bridge's receipt of the hook (the delivered body's observedAt, taken once the hook is authenticated and parsed) to sink receipt (ms): ${receivedText}, p90 ${fmt(percentile(sinceReceived, 90), 1)}, max ${fmt(sinceReceived.at(-1) ?? NaN, 1)}`,
        `send to sink receipt (ms): p50 ${fmt(p50, 1)}, p90 ${fmt(percentile(latencies, 90), 1)}, p99 ${fmt(p99, 1)}, max ${fmt(latencies.at(-1) ?? NaN, 1)}; hooks answered ${statusText}`,
        `load average (1, 5, 15 min) at start → end: ${loadText} on ${availableParallelism()} CPUs`,
      ],
    };
  } finally {
    await pg.drop();
    await sink.stop();
  }
}

