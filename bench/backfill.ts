// Backfill and re-poll (issue 8 items 2, 3 and 7): the sandbox CRM with 100,000 matters in one
// process, the real app's poller in another, the bare page loop in a third. One measurement
// serves both registry entries (the re-poll needs the backfill's heads), so it runs once.
import { mkdtempSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BenchContext, CaseResult, Figure } from './cases.js';
import { createBenchDatabase, fmt, startChild, type Child } from './child.js';
import { backendPids, costPerItem, cpuDuring } from './machine.js';
import { BENCH_HOOK_SECRET, SANDBOX_CLIENT } from './sync-shared.js';

export const BACKFILL_RECORDS = Number(process.env.BENCH_BACKFILL_RECORDS ?? 100_000);
const PAGE_SIZE = 200;
const FIRST_MATTER_ID = 200_000_001;
const TARGET = { backfill: 1.3, rssMb: 200, repoll: 1.1 };
export const peersScript = fileURLToPath(new URL('./peers.ts', import.meta.url));
export const syncScript = fileURLToPath(new URL('./sync-child.ts', import.meta.url));

/** The bridge's connection to the sandbox with the `clio` preset, as an operator would write it. */
export function sandboxConnection(sandboxUrl: string, extra: Record<string, unknown> = {}) {
  return {
    connector: 'clio',
    baseUrl: sandboxUrl,
    auth: { type: 'client_credentials', ...SANDBOX_CLIENT, tokenUrl: '/oauth/token' },
    inbound: { secrets: [BENCH_HOOK_SECRET], recordPath: 'data', object: 'matters' },
    poll: { objects: ['matters'], interval: '1h', pageSize: PAGE_SIZE, lease: '10m', sweepInterval: 0 },
    ...extra,
  };
}

/** CPU per record of each process the run kept busy (see costPerItem). */
type Cost = ReturnType<typeof costPerItem>;

interface PollResult {
  ms: number;
  cpu: Cost;
  maxRssMb: number;
  maxRssBeforeMb: number;
  report: { status: string; pages: number; records: number; counts: Record<string, number>; error?: string };
}
interface FetchResult {
  ms: number;
  cpu: Cost;
  pages: number;
  records: number;
  maxRssMb: number;
}
interface Counts {
  ledger: number;
  outbox: number;
  heads: number;
}
interface OnDatabase {
  label: 'postgres' | 'pglite';
  backfill: PollResult;
  repoll: PollResult;
  counts: Counts;
}

const rate = (records: number, ms: number) => `${fmt(records / (ms / 1000))} records/s`;

async function bareFetch(sandbox: Child, records: number): Promise<FetchResult> {
  const loop = await startChild(syncScript, ['bare'], {}, { built: true });
  try {
    const { result, seconds } = await cpuDuring(
      async () => ({ 'bare loop': [loop], sandbox: [sandbox] }),
      () => loop.ask<Omit<FetchResult, 'cpu'>>({ type: 'fetch', sandboxUrl: sandbox.url, pageSize: PAGE_SIZE, warmId: FIRST_MATTER_ID }),
    );
    if (result.records !== records) throw new Error(`the bare loop read ${result.records} records, expected ${records}`);
    return { ...result, cpu: costPerItem(seconds, records) };
  } finally {
    await loop.stop();
  }
}

async function backfillOn(label: OnDatabase['label'], env: Record<string, string>, sandbox: Child, context: BenchContext): Promise<OnDatabase> {
  const bridge = await startChild(syncScript, ['bridge'], { ...env, BENCH_LOG_LEVEL: context.logLevel, BENCH_CONNECTION: JSON.stringify(sandboxConnection(sandbox.url!)) }, { built: true });
  // The CPU of every process a run keeps busy: the bridge, its Postgres backends (embedded PGlite
  // runs in the bridge), the sandbox.
  const poll = async (request: Record<string, unknown>, what: string) => {
    const { result, seconds } = await cpuDuring(
      async () => ({ bridge: [bridge], Postgres: env.BENCH_DATABASE_URL ? await backendPids(env.BENCH_DATABASE_URL) : [], sandbox: [sandbox] }),
      () => bridge.ask<Omit<PollResult, 'cpu'>>({ type: 'poll', warmId: FIRST_MATTER_ID, ...request }, 900_000),
    );
    if (result.report.status !== 'ok') throw new Error(`${label} ${what} ${result.report.status}: ${result.report.error}`);
    return { ...result, cpu: costPerItem(seconds, result.report.records) };
  };
  try {
    const backfill = await poll({}, 'backfill');
    context.log(`  ${label} backfill: ${rate(backfill.report.records, backfill.ms)}, peak RSS ${fmt(backfill.maxRssMb)} MB (${fmt(backfill.maxRssBeforeMb)} MB before the run)`);
    // The re-poll reads everything again under a cursor of its own (as `crm-bridge backfill`
    // does), so nothing is skipped for a cursor; every record is a duplicate of its head.
    const repoll = await poll({ cursorKey: 'matters:repoll' }, 're-poll');
    context.log(`  ${label} re-poll: ${rate(repoll.report.records, repoll.ms)}`);
    const counts = await bridge.ask<Counts>({ type: 'counts' });
    return { label, backfill, repoll, counts };
  } finally {
    await bridge.stop();
  }
}

/** PGlite is far slower (its WASM Postgres shares the process's one thread): a smaller backfill keeps `npm run bench` near 8 minutes. */
export const PGLITE_RECORDS = Number(process.env.BENCH_PGLITE_RECORDS ?? 10_000);

interface Measured {
  /** Per database: the bare loops (before and after) against the same sandbox, and the bridge's runs. */
  runs: Array<OnDatabase & { records: number; bare: FetchResult[]; bareMs: number }>;
}
let measured: Promise<Measured> | undefined;

/** Per database: a sandbox of its size, the bare loop, the bridge's backfill + re-poll, the bare loop again. */
function measure(context: BenchContext) {
  measured ??= (async () => {
    const runs: Measured['runs'] = [];
    const plan: Array<{ label: OnDatabase['label']; records: number }> = [{ label: 'postgres', records: BACKFILL_RECORDS }];
    if (process.env.BENCH_SKIP_PGLITE !== '1') plan.push({ label: 'pglite', records: PGLITE_RECORDS });
    for (const { label, records } of plan) {
      const sandbox = await startChild(peersScript, ['sandbox', String(records)]);
      try {
        const bare = [await bareFetch(sandbox, records)];
        context.log(`  bare fetch (${fmt(records)}): ${rate(bare[0]!.records, bare[0]!.ms)}`);
        let run: OnDatabase;
        if (label === 'postgres') {
          const pg = await createBenchDatabase(context.postgresUrl);
          try {
            run = await backfillOn(label, { BENCH_DATABASE_URL: pg.url }, sandbox, context);
          } finally {
            await pg.drop();
          }
        } else {
          const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-bench-pglite-'));
          try {
            run = await backfillOn(label, { BENCH_PGLITE_DIR: dir }, sandbox, context);
          } finally {
            rmSync(dir, { recursive: true, force: true });
          }
        }
        bare.push(await bareFetch(sandbox, records));
        context.log(`  bare fetch (${fmt(records)}): ${rate(bare[1]!.records, bare[1]!.ms)}`);
        runs.push({ ...run, records, bare, bareMs: bare.reduce((s, b) => s + b.ms, 0) / bare.length });
      } finally {
        await sandbox.stop();
      }
    }
    return { runs };
  })();
  return measured;
}

/**
 * Why a ratio is what it is: what each record cost the cores, the most records per second that
 * allows, and the rate the target asks for (the bare loop's, divided by the target ratio).
 */
function costFigure(name: string, cost: Cost, target: number, run: { records: number; bareMs: number; bare: FetchResult[] }): Figure {
  const wanted = run.records / (run.bareMs / 1000) / target;
  return {
    name,
    value: `${cost.text}: at most ${fmt(cost.bound)} records/s on ${availableParallelism()} cores (${target} is ${fmt(wanted)}); bare fetch: ${run.bare[0]!.cpu.text}`,
    target: '—',
    pass: undefined,
  };
}

const describeCounts = (counts: Record<string, number>) =>
  Object.entries(counts)
    .map(([k, v]) => `${k} ${fmt(v)}`)
    .join(', ');

export async function runBackfillBench(context: BenchContext): Promise<CaseResult> {
  const { runs } = await measure(context);
  const figures: Figure[] = [];
  const details = [
    `sandbox matters (faults off, seed 42), page size ${PAGE_SIZE}, \`clio\` preset, client_credentials token; sandbox, bridge and bare loop each in their own process, the bridge and bare loop compiled by tsc and run by plain node (as the Docker image runs dist/), the sandbox under tsx; the bare loop is plain fetch following meta.paging.next (parse, discard), run against the same sandbox before and after the bridge`,
  ];
  for (const run of runs) {
    const primary = run.label === 'postgres';
    const ratio = run.backfill.ms / run.bareMs;
    figures.push({
      name: `backfill/${run.label} ÷ bare fetch (${fmt(run.records)})`,
      value: `${ratio.toFixed(2)} (${fmt(run.backfill.ms / 1000, 1)} s / ${fmt(run.bareMs / 1000, 1)} s)`,
      target: primary ? `≤ ${TARGET.backfill}` : 'beside Postgres',
      pass: primary ? ratio <= TARGET.backfill : undefined,
    });
    figures.push({
      name: `backfill/${run.label} peak RSS`,
      value: `${fmt(run.backfill.maxRssMb)} MB (${fmt(run.backfill.maxRssBeforeMb)} MB before the run)`,
      target: primary ? `≤ ${TARGET.rssMb} MB` : '—',
      pass: primary ? run.backfill.maxRssMb <= TARGET.rssMb : undefined,
    });
    if (primary) figures.push(costFigure(`backfill/${run.label} CPU per record`, run.backfill.cpu, TARGET.backfill, run));
    const complete = run.counts.ledger === run.records && run.counts.outbox === run.records && run.counts.heads === run.records;
    figures.push({
      name: `backfill/${run.label} every record in ledger and outbox`,
      value: `ledger ${fmt(run.counts.ledger)}, outbox ${fmt(run.counts.outbox)}, heads ${fmt(run.counts.heads)}`,
      target: `${fmt(run.records)} each`,
      pass: complete,
    });
    details.push(
      `${run.label}, ${fmt(run.records)} matters: bare loop ${run.bare.map((b) => `${fmt(b.ms / 1000, 1)} s (${rate(b.records, b.ms)}; CPU per record: ${b.cpu.text})`).join('; ')}`,
      `${run.label} backfill (pollStream, a transaction per page): ${fmt(run.backfill.ms / 1000, 1)} s, ${rate(run.backfill.report.records, run.backfill.ms)}, ${run.backfill.report.pages} pages (${describeCounts(run.backfill.report.counts)}); peak RSS of the bridge process ${fmt(run.backfill.maxRssMb)} MB (${fmt(run.backfill.maxRssBeforeMb)} MB before the run); CPU per record: ${run.backfill.cpu.text}`,
      `${run.label} re-poll (own cursor key, every record unchanged): ${fmt(run.repoll.ms / 1000, 1)} s, ${rate(run.repoll.report.records, run.repoll.ms)} (${describeCounts(run.repoll.report.counts)}); CPU per record: ${run.repoll.cpu.text}`,
    );
  }
  return { figures, details };
}

export async function runRepollBench(context: BenchContext): Promise<CaseResult> {
  const { runs } = await measure(context);
  const figures: Figure[] = runs.flatMap((run) => {
    const primary = run.label === 'postgres';
    const ratio = run.repoll.ms / run.bareMs;
    const unchanged = (run.repoll.report.counts.duplicate ?? 0) === run.records;
    const figure: Figure = {
      name: `re-poll/${run.label} ÷ bare fetch (${fmt(run.records)})`,
      value: `${ratio.toFixed(2)} (${fmt(run.repoll.ms / 1000, 1)} s / ${fmt(run.bareMs / 1000, 1)} s)${unchanged ? '' : ', NOT all duplicates'}`,
      target: primary ? `≤ ${TARGET.repoll}` : 'beside Postgres',
      pass: primary ? ratio <= TARGET.repoll && unchanged : undefined,
    };
    return primary ? [figure, costFigure(`re-poll/${run.label} CPU per record`, run.repoll.cpu, TARGET.repoll, run)] : [figure];
  });
  return { figures, details: [`measured in the same run as the backfill, against the same bare loops (details there)`] };
}
