// The other side of the sync benchmarks, each in its own process (see child.ts):
//   peers.ts sandbox <matters>   the sandbox CRM with that many matters, faults off
//   peers.ts sink                the intake pipeline: a bare Fastify server answering 202
// The sink parses each body as a pipeline would and, when the record carries `bench_sent_at`
// (epoch ms with a fraction, set by the latency bench when it sent the hook), keeps the time from
// that send to this receipt, and from the bridge's receipt of the hook (the body's observedAt) to
// this receipt. All processes read one clock: performance.timeOrigin + now(), and Date.
import Fastify from 'fastify';
import { startSandbox } from '../src/sandbox/index.js';
import { serveParent } from './child.js';

const mode = process.argv[2];
const now = () => performance.timeOrigin + performance.now();

if (mode === 'sandbox') {
  const matters = Number(process.argv[3] ?? 100_000);
  // `records` is split evenly between contacts and matters.
  const sandbox = await startSandbox({ records: matters * 2, seed: 42 });
  serveParent(
    async (request) => {
      if (request.type === 'switches') {
        sandbox.state.resetSwitches();
        sandbox.state.setSwitches(request.switches as Parameters<typeof sandbox.state.setSwitches>[0]);
        return {};
      }
      if (request.type === 'requests') {
        // API calls since `since`, for counting the budget a run used.
        const entries = sandbox.state.requestLog.list({ since: request.since as number, pathPrefix: '/api/v4' });
        return { entries: entries.map((e) => ({ at: Date.parse(e.at), status: e.status, fault: e.fault ?? null })), lastSeq: sandbox.state.requestLog.lastSeq };
      }
      if (request.type === 'lastSeq') return { lastSeq: sandbox.state.requestLog.lastSeq };
      throw new Error(`unknown request ${request.type}`);
    },
    { url: sandbox.url, close: () => sandbox.close() },
  );
} else if (mode === 'sink') {
  const app = Fastify({ bodyLimit: 10 * 1024 * 1024 });
  let received = 0;
  const latencies: number[] = [];
  const sinceReceived: number[] = [];
  const keys = new Set<string>();
  app.post('/sink', async (request, reply) => {
    const at = now();
    received++;
    const body = request.body as { id?: string; observedAt?: unknown; record?: { bench_sent_at?: unknown } } | null;
    if (typeof body?.id === 'string') keys.add(body.id);
    const sent = body?.record?.bench_sent_at;
    if (typeof sent === 'number') {
      latencies.push(at - sent);
      if (typeof body?.observedAt === 'string') sinceReceived.push(at - Date.parse(body.observedAt));
    }
    return reply.code(202).send({ status: 'accepted' });
  });
  const url = await app.listen({ host: '127.0.0.1', port: 0 });
  serveParent(
    async (request) => {
      if (request.type === 'stats') return { received, unique: keys.size, latencies: request.latencies === true ? latencies : [], sinceReceived: request.latencies === true ? sinceReceived : [] };
      if (request.type === 'reset') {
        received = 0;
        latencies.length = 0;
        sinceReceived.length = 0;
        keys.clear();
        return {};
      }
      throw new Error(`unknown request ${request.type}`);
    },
    { url: `${url}/sink`, close: () => app.close() },
  );
} else {
  throw new Error(`usage: peers.ts sandbox <matters> | sink (got ${mode})`);
}
