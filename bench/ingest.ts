// Hook ingest: the real app against a bare Fastify handler, both in child processes, both driven
// by autocannon from this process in the same run. See the description in registry.ts.
import { fork, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import autocannon, { type AutocannonResult } from 'autocannon';
import type { BenchContext, CaseResult, Figure } from './cases.js';
import { compileBench, createBenchDatabase, imageNodeOptions } from './child.js';
import { HOOK_SECRET, type ParentMessage, type ServerMessage } from './ingest-protocol.js';
import { backendPids, costPerItem, cpuDuring } from './machine.js';

const CONNECTIONS = 50;
const WARMUP_SECONDS = 2;
const TARGET_RATIO = 0.5;

/** A Clio-like matter of about 1 KB; only the id changes between requests of a "new" run. */
export function matterBody(id: string): string {
  return JSON.stringify({
    id,
    etag: '"9f1c2b7e"',
    display_number: `${id}-Doe`,
    status: 'Open',
    description: `Slip and fall at grocery store. ${'Client reports a wet floor without signage near aisle 7; witness statements pending. '.repeat(9)}`,
    practice_area: { id: 7, name: 'Personal Injury' },
    client: { id: 9001, name: 'Jane Doe' },
    created_at: '2026-11-01T09:00:00Z',
    updated_at: '2026-11-20T10:00:00Z',
  });
}

interface Server {
  url: string;
  pid: number;
  ask(message: ParentMessage): Promise<ServerMessage>;
  stop(): Promise<void>;
}

async function startServer(mode: 'bare' | 'bridge', env: Record<string, string>): Promise<Server> {
  const devNull = openSync('/dev/null', 'w');
  // Compiled and run by plain node, as the Docker image runs the app (see compileBench).
  const built = join(await compileBench(), 'bench/ingest-server.js');
  const child: ChildProcess = fork(built, [mode], {
    execArgv: [...(process.env.BENCH_CPU_PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF}`] : [])],
    env: { ...process.env, NODE_OPTIONS: imageNodeOptions(), ...env },
    stdio: ['ignore', devNull, 'inherit', 'ipc'],
  });
  closeSync(devNull);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const next = (timeoutMs: number) =>
    new Promise<ServerMessage>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${mode} server: no answer in ${timeoutMs} ms`)), timeoutMs);
      child.once('message', (m: ServerMessage) => {
        clearTimeout(timer);
        resolve(m);
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`${mode} server exited with code ${code}`));
      });
    });
  const first = await next(60_000).catch((err: unknown) => {
    child.kill('SIGKILL');
    throw err;
  });
  if (first.type !== 'listening') {
    child.kill('SIGKILL');
    throw new Error(`${mode} server: ${JSON.stringify(first)}`);
  }
  return {
    url: first.url,
    pid: child.pid!,
    ask: (message) => {
      const answer = next(60_000);
      child.send(message);
      return answer;
    },
    stop: async () => {
      if (child.exitCode === null) child.send({ type: 'stop' } satisfies ParentMessage);
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

interface Load {
  result: AutocannonResult;
  reqPerSec: number;
  acceptedEventIds: string[];
  duplicateEventIds: string[];
}

const EVENT_ID = /"eventId":"([0-9a-f-]{36})"/;

/** What each request cost the cores (see costPerItem), and whether Postgres's backends were among them. */
type CpuPerRequest = ReturnType<typeof costPerItem> & { database: boolean };

/**
 * Runs `run` and says how much CPU each side used per request: the server process (`name`), its
 * Postgres backends, and autocannon (this process). Undefined without /proc.
 */
async function metered(server: Server, name: string, databaseUrl: string | undefined, run: () => Promise<Load>): Promise<{ load: Load; cpu: CpuPerRequest | undefined }> {
  const { result, seconds } = await cpuDuring(
    async () => ({ [name]: [server], Postgres: databaseUrl === undefined ? [] : await backendPids(databaseUrl), autocannon: [{ pid: process.pid }] }),
    run,
  );
  if (seconds[name] === undefined) return { load: result, cpu: undefined };
  return { load: result, cpu: { ...costPerItem(seconds, result.result.requests.total), database: seconds.Postgres !== undefined } };
}

const describeCpu = (cpu: CpuPerRequest | undefined) =>
  cpu === undefined ? 'not measured (no /proc)' : `${cpu.text} per request: at most ${fmt(cpu.bound)} req/s on ${availableParallelism()} cores`;

/** One bounded autocannon run. `ids`: a prefix for a new record per request, or one fixed id. */
async function load(url: string, seconds: number, ids: { newPrefix: string } | { fixed: string }): Promise<Load> {
  const acceptedEventIds: string[] = [];
  const duplicateEventIds: string[] = [];
  let n = 0;
  const fixedBody = 'fixed' in ids ? matterBody(ids.fixed) : undefined;
  const result = await autocannon({
    url: `${url}/hooks/bench`,
    connections: CONNECTIONS,
    duration: seconds,
    timeout: 10,
    requests: [
      {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${HOOK_SECRET}` },
        setupRequest: (request) => ({ ...request, body: fixedBody ?? matterBody(`${(ids as { newPrefix: string }).newPrefix}-${n++}`) }),
        // Also on the baseline, so the load generator does the same work in both.
        onResponse: (status, body) => {
          const eventId = EVENT_ID.exec(body)?.[1];
          if (eventId === undefined) return;
          if (status === 202) acceptedEventIds.push(eventId);
          else if (status === 200) duplicateEventIds.push(eventId);
        },
      },
    ],
  });
  return { result, reqPerSec: result.requests.total / result.duration, acceptedEventIds, duplicateEventIds };
}

const fmt = (n: number, digits = 0) => n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
const statusSummary = (r: AutocannonResult) =>
  Object.entries(r.statusCodeStats)
    .map(([code, { count }]) => `${code}×${fmt(count)}`)
    .join(', ') + (r.errors > 0 ? `, errors×${r.errors} (timeouts ${r.timeouts})` : '');

interface BridgeRuns {
  label: 'postgres' | 'pglite';
  fresh: Load;
  freshCpu: CpuPerRequest | undefined;
  dup: Load;
  accepted: number;
  durable: boolean;
  failures: number;
  details: string[];
}

/** Starts the real app, warms it, runs "new" then "duplicate" load, and checks every answer against the ledger. */
async function measureBridge(label: BridgeRuns['label'], env: Record<string, string>, context: BenchContext): Promise<BridgeRuns> {
  const server = await startServer('bridge', { ...env, BENCH_LOG_LEVEL: context.logLevel });
  try {
    const warm = await load(server.url, WARMUP_SECONDS, { newPrefix: `warm-${label}` });
    const { load: fresh, cpu: freshCpu } = await metered(server, 'app', env.BENCH_DATABASE_URL, () => load(server.url, context.seconds, { newPrefix: `new-${label}` }));
    context.log(`  ${label} new: ${fmt(fresh.reqPerSec)} req/s, p99 ${fresh.result.latency.p99} ms (${statusSummary(fresh.result)})`);
    const dup = await load(server.url, context.seconds, { fixed: `dup-${label}` });
    context.log(`  ${label} duplicate: ${fmt(dup.reqPerSec)} req/s, p99 ${dup.result.latency.p99} ms (${statusSummary(dup.result)})`);

    const accepted = [warm, fresh, dup].flatMap((l) => l.acceptedEventIds);
    const duplicates = [warm, fresh, dup].flatMap((l) => l.duplicateEventIds);
    const verified = await server.ask({ type: 'verify', acceptedEventIds: accepted, duplicateEventIds: duplicates });
    if (verified.type !== 'verified') throw new Error(`${label} verify: ${JSON.stringify(verified)}`);
    const answeredIds = new Set([...accepted, ...duplicates]).size;
    return {
      label,
      fresh,
      freshCpu,
      dup,
      accepted: accepted.length,
      // Every eventId answered (202 or 200 duplicate) has a committed ledger row; every 202 an outbox row.
      durable: verified.ledgerMatches === answeredIds && verified.outboxMatches === accepted.length,
      failures: [warm, fresh, dup].reduce((s, l) => s + l.result.non2xx + l.result.errors, 0),
      details: [
        `${label} new: ${fmt(fresh.reqPerSec)} req/s, latency p50 ${fresh.result.latency.p50} ms, p99 ${fresh.result.latency.p99} ms, max ${fresh.result.latency.max} ms; ${statusSummary(fresh.result)}`,
        `${label} new, CPU: ${describeCpu(freshCpu)}`,
        `${label} duplicate: ${fmt(dup.reqPerSec)} req/s, latency p50 ${dup.result.latency.p50} ms, p99 ${dup.result.latency.p99} ms; ${statusSummary(dup.result)}`,
        `${label} after the runs (warm-up included): ledger ${fmt(verified.ledgerRows)} rows, outbox ${fmt(verified.outboxRows)} rows; ${fmt(verified.ledgerMatches)} of ${fmt(answeredIds)} answered eventIds found in the ledger, ${fmt(verified.outboxMatches)} of ${fmt(accepted.length)} 202s in the outbox`,
      ],
    };
  } finally {
    await server.stop();
  }
}

function bridgeFigures(r: BridgeRuns, baseRps: number): Figure[] {
  const ratio = r.fresh.reqPerSec / baseRps;
  const primary = r.label === 'postgres';
  const { latency } = r.fresh.result;
  return [
    {
      name: `ingest/${r.label} new ÷ bare`,
      value: `${ratio.toFixed(2)} (${fmt(r.fresh.reqPerSec)} / ${fmt(baseRps)} req/s)`,
      target: primary ? `≥ ${TARGET_RATIO}` : 'beside Postgres',
      pass: primary ? ratio >= TARGET_RATIO : undefined,
    },
    { name: `ingest/${r.label} new p99`, value: `${latency.p99} ms (p50 ${latency.p50} ms)`, target: '—', pass: undefined },
    // Why the ratio is what it is: the CPU each new hook costs, and what that allows on these cores.
    ...(primary && r.freshCpu?.database
      ? [
          {
            name: `ingest/${r.label} CPU per new hook`,
            value: `${r.freshCpu.text}: at most ${fmt(r.freshCpu.bound)} hooks/s on ${availableParallelism()} cores (${TARGET_RATIO} is ${fmt(TARGET_RATIO * baseRps)})`,
            target: '—',
            pass: undefined,
          },
        ]
      : []),
    {
      name: `ingest/${r.label} duplicate ÷ bare`,
      value: `${(r.dup.reqPerSec / baseRps).toFixed(2)} (${fmt(r.dup.reqPerSec)} req/s, p99 ${r.dup.result.latency.p99} ms)`,
      target: '—',
      pass: undefined,
    },
    {
      name: `ingest/${r.label} every 202 durable`,
      value: `${r.durable ? 'all' : 'NOT all'} of ${fmt(r.accepted)} 202s committed; ${r.failures} non-2xx/errors`,
      target: 'all, 0 failures',
      pass: r.durable && r.failures === 0,
    },
  ];
}

export async function runIngestBench(context: BenchContext): Promise<CaseResult> {
  // The baseline is measured before and after the bridge runs; the ratio uses their mean, so a
  // noisy neighbour that comes or goes mid-run moves both sides.
  const baselines: Load[] = [];
  const baselineCpu: string[] = [];
  const measureBaseline = async () => {
    const bare = await startServer('bare', {});
    try {
      await load(bare.url, WARMUP_SECONDS, { newPrefix: 'warm-bare' });
      const { load: run, cpu } = await metered(bare, 'bare server', undefined, () => load(bare.url, context.seconds, { newPrefix: 'bare' }));
      context.log(`  bare baseline: ${fmt(run.reqPerSec)} req/s, p99 ${run.result.latency.p99} ms (${statusSummary(run.result)})`);
      baselines.push(run);
      baselineCpu.push(describeCpu(cpu));
    } finally {
      await bare.stop();
    }
  };
  const baselineRps = () => baselines.reduce((s, b) => s + b.reqPerSec, 0) / baselines.length;

  await measureBaseline();
  const pg = await createBenchDatabase(context.postgresUrl);
  let onPostgres: BridgeRuns;
  try {
    onPostgres = await measureBridge('postgres', { BENCH_DATABASE_URL: pg.url }, context);
  } finally {
    await pg.drop();
  }
  const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-bench-pglite-'));
  let onPglite: BridgeRuns;
  try {
    onPglite = await measureBridge('pglite', { BENCH_PGLITE_DIR: dir }, context);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  await measureBaseline();

  const base = baselineRps();
  return {
    figures: [...bridgeFigures(onPostgres, base), ...bridgeFigures(onPglite, base)],
    details: [
      `${CONNECTIONS} connections, ${context.seconds} s per measured run after a ${WARMUP_SECONDS} s warm-up, body ${Buffer.byteLength(matterBody('new-postgres-12345'))} bytes`,
      `bare Fastify baseline (before; after): ${baselines.map((b) => `${fmt(b.reqPerSec)} req/s, p99 ${b.result.latency.p99} ms`).join('; ')}; mean ${fmt(base)} req/s`,
      `bare Fastify baseline, CPU (before; after): ${baselineCpu.join('; ')}`,
      ...onPostgres.details,
      ...onPglite.details,
    ],
  };
}
