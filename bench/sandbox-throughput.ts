// Sandbox CRM benchmark: list throughput with faults off, and memory with 1,000,000 records.
// Run: npx tsx bench/sandbox-throughput.ts [--records 1000000] [--pages 500] [--concurrency 4]
// The HTTP client runs in the same process as the server, so the throughput is a lower bound.
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { startSandbox } from '../src/sandbox/index.js';

const arg = (name: string, fallback: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  const v = i >= 0 ? Number(process.argv[i + 1]) : NaN;
  return Number.isFinite(v) ? v : fallback;
};

const RECORDS = arg('records', 1_000_000);
const PAGES = arg('pages', 500);
const CONCURRENCY = arg('concurrency', 4);
const TARGET_RPS = 5_000;
const TARGET_BYTES = 1024 ** 3;
const FIELDS = 'id,etag,display_number,description,status,created_at,updated_at,client{id,name},practice_area{id,name},custom_field_values{field_name,value}';

setFlagsFromString('--expose_gc');
const gc = runInNewContext('gc') as () => void;
const mib = (n: number): string => `${(n / 1024 ** 2).toFixed(0)} MiB`;

gc();
const baseline = process.memoryUsage();
const loadStart = performance.now();
const sb = await startSandbox({ records: RECORDS, seed: 42 });
const loadMs = performance.now() - loadStart;
gc();
const mem = process.memoryUsage();

const token = sb.state.issueToken().access_token;
const headers = { authorization: `Bearer ${token}` };

/** Follows cursor pages from a starting id range; returns records served. */
async function crawl(startAfterPage: string | null, pages: number): Promise<number> {
  let next: string | undefined = startAfterPage ?? `${sb.url}/api/v4/matters.json?order=id(asc)&limit=200&fields=${encodeURIComponent(FIELDS)}`;
  let served = 0;
  for (let i = 0; i < pages && next; i++) {
    const res = await fetch(next, { headers });
    if (res.status !== 200) throw new Error(`status ${res.status}`);
    const body = (await res.json()) as { data: unknown[]; meta: { paging: { next?: string } } };
    served += body.data.length;
    next = body.meta.paging.next;
  }
  return served;
}

await crawl(null, 20); // warm-up

const single0 = performance.now();
const singleServed = await crawl(null, PAGES);
const singleRps = singleServed / ((performance.now() - single0) / 1000);

// Concurrent crawlers start at different places in the id range, as several streams would.
const matters = sb.state.store.matters.items;
const starts = Array.from({ length: CONCURRENCY }, (_, i) => {
  const after = matters[Math.floor((i * matters.length) / CONCURRENCY)]?.id ?? 0;
  const token = Buffer.from(JSON.stringify({ a: after })).toString('base64url');
  return `${sb.url}/api/v4/matters.json?order=id(asc)&limit=200&page_token=${token}&fields=${encodeURIComponent(FIELDS)}`;
});
const multi0 = performance.now();
const multiServed = (await Promise.all(starts.map((s) => crawl(s, Math.ceil(PAGES / CONCURRENCY))))).reduce((a, b) => a + b, 0);
const multiRps = multiServed / ((performance.now() - multi0) / 1000);

await sb.close();

const verdict = (ok: boolean): string => (ok ? 'OK' : 'MISSED');
console.log(`sandbox CRM benchmark (node ${process.version}, ${RECORDS.toLocaleString('en-US')} records, fields=${FIELDS})`);
console.log(`  load ${RECORDS.toLocaleString('en-US')} records:        ${(loadMs / 1000).toFixed(1)} s`);
console.log(`  heap used after load (after gc): ${mib(mem.heapUsed)} (baseline ${mib(baseline.heapUsed)})`);
console.log(`  RSS after load:                  ${mib(mem.rss)}   target <= ${mib(TARGET_BYTES)}   ${verdict(mem.rss <= TARGET_BYTES)}`);
console.log(`  list pages of 200, 1 client:     ${Math.round(singleRps).toLocaleString('en-US')} records/s   target >= ${TARGET_RPS.toLocaleString('en-US')}   ${verdict(singleRps >= TARGET_RPS)}`);
console.log(`  list pages of 200, ${CONCURRENCY} clients:    ${Math.round(multiRps).toLocaleString('en-US')} records/s   target >= ${TARGET_RPS.toLocaleString('en-US')}   ${verdict(multiRps >= TARGET_RPS)}`);
if (mem.rss > TARGET_BYTES || singleRps < TARGET_RPS) process.exitCode = 1;
