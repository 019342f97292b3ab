// `npx tsx bench/post-cost.ts`: what a delivery's POST costs the sender with each HTTP client Node
// offers, fetch, node:http with a kept-alive agent, and undici's request (the delivery worker's),
// alternating in one process: 4 at a time, ~1 KB bodies, to the bench sink in its own process.
// Not part of `npm run bench`.
import http from 'node:http';
import { request } from 'undici';
import { startChild } from './child.js';
import { matterBody } from './ingest.js';

const N = 6_000;
const CONCURRENCY = 4;
const sink = await startChild('bench/peers.ts', ['sink']);
const url = new URL(sink.url!);
const bodies = Array.from({ length: N }, (_, i) => JSON.stringify({ id: `event-${i}`, record: JSON.parse(matterBody(`m-${i}`)) }));
const headers = { 'content-type': 'application/json', 'idempotency-key': 'k' };
const agent = new http.Agent({ keepAlive: true, maxSockets: CONCURRENCY });

const clients: Record<string, (body: string) => Promise<number>> = {
  fetch: async (body) => {
    const res = await fetch(url, { method: 'POST', headers, body, redirect: 'manual' });
    await res.body?.cancel();
    return res.status;
  },
  'node:http': (body) =>
    new Promise((resolve, reject) => {
      const req = http.request(url, { method: 'POST', agent, headers: { ...headers, 'content-length': Buffer.byteLength(body) } }, (res) => {
        res.resume().on('end', () => resolve(res.statusCode!)).on('error', reject);
      });
      req.on('error', reject).end(body);
    }),
  'undici request': async (body) => {
    const res = await request(url, { method: 'POST', headers, body });
    await res.body.dump();
    return res.statusCode;
  },
};

try {
  for (let round = 0; round < 3; round++) {
    for (const [name, send] of Object.entries(clients)) {
      let next = 0;
      const cpu = process.cpuUsage();
      const began = performance.now();
      await Promise.all(
        Array.from({ length: CONCURRENCY }, async () => {
          for (let i = next++; i < N; i = next++) if ((await send(bodies[i]!)) !== 202) throw new Error(`${name}: POST ${i} was not answered 202`);
        }),
      );
      const seconds = (performance.now() - began) / 1000;
      const used = process.cpuUsage(cpu);
      console.log(`${name.padEnd(15)} ${Math.round(N / seconds).toLocaleString('en-US').padStart(6)} POSTs/s  ${Math.round((used.user + used.system) / N)} µs CPU a POST (sender)`);
    }
  }
} finally {
  await sink.stop();
  agent.destroy();
}
