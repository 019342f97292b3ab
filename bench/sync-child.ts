// The measured side of the sync benchmarks, one process per run (see child.ts):
//   sync-child.ts bridge   the real app (buildApp) on Postgres (BENCH_DATABASE_URL) or PGlite
//                          (BENCH_PGLITE_DIR), with the connection in BENCH_CONNECTION (JSON);
//                          listens on 127.0.0.1 for hooks; daemons start when BENCH_START_DAEMONS=1
//   sync-child.ts bare     the baselines: fetch the same pages and discard them; POST the same
//                          bodies at the same concurrency with the bridge's delivery client
// Timings are taken here, around the work only (process start, migrations and token fetch
// excluded on both sides).
import { setTimeout as sleep } from 'node:timers/promises';
import { count, eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { request as undiciRequest } from 'undici';
import { buildApp } from '../src/app.js';
import { loadConfig } from '../src/config/load.js';
import { clio } from '../src/crm/presets/clio.js';
import { openDatabase, type Database } from '../src/db/client.js';
import { ledger, outbox, recordHeads } from '../src/db/schema/index.js';
import { passChanges, type ObservedChange } from '../src/sync/change-gate.js';
import { pollStream } from '../src/sync/poller.js';
import { observeRecord } from '../src/sync/record.js';
import { serveParent, type Request } from './child.js';
import { BENCH_CONNECTION_ID, BENCH_TOKEN_KEY, benchMatter, SANDBOX_CLIENT } from './sync-shared.js';

/** The delivery body the worker builds (src/sync/delivery-worker.ts), for the bare POST loop. */
function deliveryBody(id: number, eventId: string): string {
  return JSON.stringify({
    id: eventId,
    connection: BENCH_CONNECTION_ID,
    object: 'matters',
    crmId: String(id),
    change: 'upsert',
    version: `"${id.toString(16)}"`,
    origin: 'crm',
    source: 'poll',
    observedAt: new Date().toISOString(),
    record: benchMatter(id),
    fields: { displayNumber: `${id}-Doe`, status: 'Open', practiceArea: 'Personal Injury' },
  });
}

const mode = process.argv[2];
const maxRssMb = () => process.resourceUsage().maxRSS / 1024;

if (mode === 'bridge') {
  const url = process.env.BENCH_DATABASE_URL;
  const database: Database = url ? openDatabase({ url }) : openDatabase({ dataDir: process.env.BENCH_PGLITE_DIR ?? 'memory://' });
  const connection = JSON.parse(process.env.BENCH_CONNECTION ?? '{}') as Record<string, unknown>;
  const config = loadConfig(
    { LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? 'info', DATA_DIR: process.env.BENCH_PGLITE_DIR ?? 'memory://', TOKEN_ENCRYPTION_KEY: BENCH_TOKEN_KEY },
    { connections: [{ id: BENCH_CONNECTION_ID, ...connection }] },
  );
  // Logs go to this process's stdout (the parent points it at /dev/null), as in production.
  const app: FastifyInstance = await buildApp({ config, database, startDaemons: process.env.BENCH_START_DAEMONS === '1' });
  const address = await app.listen({ host: '127.0.0.1', port: 0 });
  serveParent((request) => bridgeRequest(app, database, request), {
    url: address,
    close: async () => {
      await app.close();
      await database.close();
    },
  });
} else if (mode === 'bare') {
  serveParent(bareRequest);
} else {
  throw new Error(`usage: sync-child.ts bridge|bare (got ${mode})`);
}

async function bridgeRequest(app: FastifyInstance, database: Database, request: Request): Promise<Record<string, unknown>> {
  const { db } = database;
  switch (request.type) {
    case 'poll': {
      const ctx = app.poller.stream(BENCH_CONNECTION_ID, 'matters');
      // The token and the first connection are not part of the figure (the bare loop fetches its token first too).
      await ctx.connector.getRecord('matters', String(request.warmId));
      const signal = typeof request.abortAfterMs === 'number' ? AbortSignal.timeout(request.abortAfterMs) : undefined;
      const rssBefore = maxRssMb();
      const began = performance.now();
      const report = await pollStream(ctx, {
        ...(typeof request.cursorKey === 'string' ? { cursorKey: request.cursorKey } : {}),
        ...(signal ? { signal } : {}),
      });
      const ms = performance.now() - began;
      return { ms, report, maxRssMb: maxRssMb(), maxRssBeforeMb: rssBefore };
    }
    case 'counts': {
      const [l] = await db.select({ n: count() }).from(ledger);
      const [o] = await db.select({ n: count() }).from(outbox);
      const [h] = await db.select({ n: count() }).from(recordHeads);
      const [d] = await db.select({ n: count() }).from(outbox).where(eq(outbox.state, 'delivered'));
      return { ledger: l!.n, outbox: o!.n, heads: h!.n, delivered: d!.n };
    }
    case 'seed-outbox': {
      // New changes straight through the gate, a page's worth per transaction: the outbox rows
      // (and their ledger rows and bodies) the delivery worker will send.
      const n = request.n as number;
      const definition = app.connections.get(BENCH_CONNECTION_ID)!.connector.objects.matters!;
      for (let i = 0; i < n; i += 500) {
        const changes: ObservedChange[] = [];
        for (let id = i; id < Math.min(n, i + 500); id++) {
          const raw = benchMatter(300_000_000 + id);
          changes.push(observeRecord({ connectionId: BENCH_CONNECTION_ID, object: 'matters', definition, raw, source: 'poll', observedAt: new Date() })!);
        }
        await db.transaction((tx) => passChanges(tx, changes));
      }
      // Fresh statistics, as autovacuum would have them on a queue that built up over time.
      if (database.driver === 'postgres') await db.execute(sql`analyze outbox`);
      return {};
    }
    case 'deliver': {
      // The worker's own loop (Daemon.run without the pause: a full batch asks for the next at once).
      const worker = app.deliveryWorkers.get(BENCH_CONNECTION_ID)!;
      const n = request.n as number;
      const controller = new AbortController();
      const began = performance.now();
      let delivered = 0;
      while (delivered < n) {
        const more = await worker.tick(controller.signal);
        if (!more) {
          const [d] = await db.select({ n: count() }).from(outbox).where(eq(outbox.state, 'delivered'));
          delivered = d!.n;
          if (delivered < n) await sleep(5);
        }
      }
      return { ms: performance.now() - began, maxRssMb: maxRssMb() };
    }
    default:
      throw new Error(`unknown request ${request.type}`);
  }
}

async function bareRequest(request: Request): Promise<Record<string, unknown>> {
  switch (request.type) {
    case 'fetch': {
      // The pages the poller reads (the clio preset's list call, page size 200), fetched one
      // after another with plain fetch following meta.paging.next, parsed and discarded.
      const base = request.sandboxUrl as string;
      const tokenRes = await fetch(`${base}/oauth/token`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ grant_type: 'client_credentials', client_id: SANDBOX_CLIENT.clientId, client_secret: SANDBOX_CLIENT.clientSecret }).toString(),
      });
      const token = ((await tokenRes.json()) as { access_token: string }).access_token;
      const list = (clio.objects as Record<string, { list: { request: { path: string; query: Record<string, string> } } }>).matters!.list.request;
      const first = new URL(list.path, base);
      for (const [k, v] of Object.entries(list.query)) first.searchParams.set(k, v === '{{limit}}' ? String(request.pageSize) : v === '{{since}}' ? new Date(0).toISOString() : v);
      const headers = { accept: 'application/json', authorization: `Bearer ${token}`, 'user-agent': 'crm-bridge' };
      await (await fetch(`${base}/api/v4/matters/${request.warmId}.json`, { headers })).text();
      const began = performance.now();
      let next: string | undefined = first.toString();
      let pages = 0;
      let records = 0;
      while (next) {
        const res = await fetch(next, { headers });
        if (res.status !== 200) throw new Error(`page ${pages}: HTTP ${res.status}`);
        const body = JSON.parse(await res.text()) as { data: unknown[]; meta: { paging: { next?: string } } };
        pages++;
        records += body.data.length;
        next = body.meta.paging.next;
      }
      return { ms: performance.now() - began, pages, records, maxRssMb: maxRssMb() };
    }
    case 'post': {
      const n = request.n as number;
      const concurrency = request.concurrency as number;
      const sinkUrl = request.sinkUrl as string;
      const bodies = Array.from({ length: n }, (_, i) => deliveryBody(300_000_000 + i, crypto.randomUUID()));
      let nextIndex = 0;
      const began = performance.now();
      await Promise.all(
        Array.from({ length: concurrency }, async () => {
          for (let i = nextIndex++; i < n; i = nextIndex++) {
            // The bridge's own HTTP client for deliveries (undici's request), so the ratio is
            // what the bridge adds to the POSTs, not a difference between clients.
            const res = await undiciRequest(sinkUrl, {
              method: 'POST',
              headers: { 'content-type': 'application/json', 'idempotency-key': String(i) },
              body: bodies[i]!,
            });
            await res.body.dump();
            if (res.statusCode !== 202) throw new Error(`POST ${i}: HTTP ${res.statusCode}`);
          }
        }),
      );
      return { ms: performance.now() - began };
    }
    default:
      throw new Error(`unknown request ${request.type}`);
  }
}
