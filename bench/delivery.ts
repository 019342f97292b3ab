// Delivery (issue 8 item 4): 50,000 outbox rows sent by the real DeliveryWorker to a bare sink,
// against a bare loop POSTing the same bodies at the same concurrency to the same sink. Sink,
// bridge and bare loop each run in their own process.
import { availableParallelism } from 'node:os';
import type { BenchContext, CaseResult } from './cases.js';
import { peersScript, syncScript } from './backfill.js';
import { createBenchDatabase, fmt, startChild } from './child.js';
import { backendPids, costPerItem, cpuDuring } from './machine.js';

/** 50,000 as issue 8 asks (about 35 s of delivery here); BENCH_DELIVERY_ROWS for a shorter run. */
const ROWS = Number(process.env.BENCH_DELIVERY_ROWS ?? 50_000);
/** The downstream default (src/config/schema.ts), so the figure is for the configuration shipped. */
const CONCURRENCY = 4;
const TARGET = 0.7;

interface Timed {
  ms: number;
}

export async function runDeliveryBench(context: BenchContext): Promise<CaseResult> {
  const sink = await startChild(peersScript, ['sink']);
  try {
    const bareRun = async () => {
      await sink.ask({ type: 'reset' });
      const loop = await startChild(syncScript, ['bare'], {}, { built: true });
      let measured;
      try {
        measured = await cpuDuring(
          async () => ({ 'bare loop': [loop], sink: [sink] }),
          () => loop.ask<Timed>({ type: 'post', sinkUrl: sink.url, n: ROWS, concurrency: CONCURRENCY }),
        );
      } finally {
        await loop.stop();
      }
      const stats = await sink.ask<{ received: number }>({ type: 'stats' });
      if (stats.received !== ROWS) throw new Error(`the sink received ${stats.received} bare POSTs, expected ${ROWS}`);
      context.log(`  bare POST loop: ${fmt(ROWS / (measured.result.ms / 1000))} req/s`);
      return { ...measured.result, cpu: costPerItem(measured.seconds, ROWS) };
    };
    const before = await bareRun();

    const pg = await createBenchDatabase(context.postgresUrl);
    let bridgeRun: Timed & { maxRssMb: number };
    let bridgeCpu: ReturnType<typeof costPerItem>;
    let stats: { received: number; unique: number };
    try {
      const connection = {
        connector: 'clio',
        baseUrl: 'http://127.0.0.1:9',
        inbound: { secrets: ['bench-hook-secret-0123456789abcdef'], recordPath: 'data', object: 'matters' },
        downstream: { url: sink.url, concurrency: CONCURRENCY },
      };
      const bridge = await startChild(syncScript, ['bridge'], { BENCH_DATABASE_URL: pg.url, BENCH_LOG_LEVEL: context.logLevel, BENCH_CONNECTION: JSON.stringify(connection) }, { built: true });
      try {
        await bridge.ask({ type: 'seed-outbox', n: ROWS });
        await sink.ask({ type: 'reset' });
        // The CPU of every process the deliveries keep busy: the bridge, its Postgres backends, the sink.
        const measured = await cpuDuring(
          async () => ({ bridge: [bridge], Postgres: await backendPids(pg.url), sink: [sink] }),
          () => bridge.ask<Timed & { maxRssMb: number }>({ type: 'deliver', n: ROWS }),
        );
        bridgeRun = measured.result;
        bridgeCpu = costPerItem(measured.seconds, ROWS);
        stats = await sink.ask<{ received: number; unique: number }>({ type: 'stats' });
      } finally {
        await bridge.stop();
      }
    } finally {
      await pg.drop();
    }
    context.log(`  DeliveryWorker: ${fmt(ROWS / (bridgeRun.ms / 1000))} deliveries/s`);
    const after = await bareRun();

    const bareMs = (before.ms + after.ms) / 2;
    const ratio = bareMs / bridgeRun.ms;
    return {
      figures: [
        {
          name: 'delivery/postgres ÷ bare POST',
          value: `${ratio.toFixed(2)} (${fmt(ROWS / (bridgeRun.ms / 1000))} / ${fmt(ROWS / (bareMs / 1000))} per s)`,
          target: `≥ ${TARGET}`,
          pass: ratio >= TARGET,
        },
        {
          // Why the ratio is what it is: what each delivery costs the cores, against a bare POST.
          name: 'delivery/postgres CPU per delivery',
          value: `${bridgeCpu.text}: at most ${fmt(bridgeCpu.bound)}/s on ${availableParallelism()} cores (${TARGET} is ${fmt(TARGET * (ROWS / (bareMs / 1000)))}); bare POST: ${before.cpu.text}`,
          target: '—',
          pass: undefined,
        },
        {
          name: 'delivery/postgres every row delivered once',
          value: `${fmt(stats.unique)} unique of ${fmt(stats.received)} received`,
          target: `${fmt(ROWS)}, no repeats`,
          pass: stats.unique === ROWS && stats.received === ROWS,
        },
      ],
      details: [
        `${fmt(ROWS)} outbox rows (~1 KB matters, seeded through the gate before timing) on Postgres; DeliveryWorker ticks back to back (its daemon loop without the pause), concurrency ${CONCURRENCY} (the default); sink: bare Fastify answering 202 in its own process`,
        `bare loop (${CONCURRENCY} concurrent POSTs with undici, the bridge's client, of bodies built in memory; before and after): ${[before, after].map((b) => `${fmt(b.ms / 1000, 1)} s (CPU per POST: ${b.cpu.text})`).join('; ')}`,
        `DeliveryWorker: ${fmt(bridgeRun.ms / 1000, 1)} s, ${fmt(ROWS / (bridgeRun.ms / 1000))} deliveries/s, peak RSS ${fmt(bridgeRun.maxRssMb)} MB; CPU per delivery: ${bridgeCpu.text}`,
      ],
    };
  } finally {
    await sink.stop();
  }
}
