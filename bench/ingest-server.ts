// Child process for the ingest benchmark: the server under load runs here, away from the load
// generator's event loop. `bare` is the baseline (Fastify parsing the same body, nothing else);
// `bridge` is the real app from buildApp on Postgres (BENCH_DATABASE_URL) or embedded PGlite
// (BENCH_PGLITE_DIR). The parent talks to it over IPC: it reports its address, answers
// `verify` with ledger/outbox counts, and exits on `stop` or when the parent goes away.
import { count, inArray } from 'drizzle-orm';
import Fastify, { type FastifyInstance } from 'fastify';
import { buildApp } from '../src/app.js';
import { loadConfig } from '../src/config/load.js';
import { openDatabase, type Database } from '../src/db/client.js';
import { ledger, outbox } from '../src/db/schema/index.js';
import { BENCH_MATTERS, HOOK_SECRET, type ParentMessage, type ServerMessage } from './ingest-protocol.js';

/** Hard stop, so a stuck child can never outlive a bench run. */
const MAX_LIFETIME_MS = 5 * 60_000;

const send = (message: ServerMessage) => process.send?.(message);
const mode = process.argv[2];

let app: FastifyInstance;
let database: Database | undefined;
if (mode === 'bare') {
  app = Fastify();
  app.post('/hooks/:connection', async (request, reply) => {
    // The body is parsed by Fastify's JSON parser (secure-json-parse), as the app's is.
    if (request.body === null || typeof request.body !== 'object') return reply.code(422).send();
    return reply.code(202).send({ status: 'accepted' });
  });
} else if (mode === 'bridge') {
  const url = process.env.BENCH_DATABASE_URL;
  database = url ? openDatabase({ url }) : openDatabase({ dataDir: process.env.BENCH_PGLITE_DIR ?? 'memory://' });
  const config = loadConfig(
    { LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? 'info', DATA_DIR: process.env.BENCH_PGLITE_DIR ?? 'memory://' },
    {
      connections: [
        {
          id: 'bench',
          connector: {
            objects: { matters: BENCH_MATTERS },
          },
          inbound: { secrets: [HOOK_SECRET] },
        },
      ],
    },
  );
  // Logs go to this process's stdout at the configured level, as in production; the parent
  // points stdout at /dev/null so the cost of writing them is paid here and not in a pipe.
  app = await buildApp({ config, database });
} else {
  throw new Error(`usage: ingest-server.ts bare|bridge (got ${mode})`);
}

async function verify(message: Extract<ParentMessage, { type: 'verify' }>): Promise<ServerMessage> {
  if (!database) return { type: 'failed', message: 'the bare server has no database' };
  const { db } = database;
  const [l] = await db.select({ n: count() }).from(ledger);
  const [o] = await db.select({ n: count() }).from(outbox);
  let ledgerMatches = 0;
  let outboxMatches = 0;
  const ids = [...new Set([...message.acceptedEventIds, ...message.duplicateEventIds])];
  const accepted = new Set(message.acceptedEventIds);
  for (let i = 0; i < ids.length; i += 5_000) {
    const chunk = ids.slice(i, i + 5_000);
    const rows = await db.select({ eventId: ledger.eventId }).from(ledger).where(inArray(ledger.eventId, chunk));
    ledgerMatches += rows.length;
    const acceptedChunk = chunk.filter((id) => accepted.has(id));
    if (acceptedChunk.length > 0) {
      const queued = await db.select({ eventId: outbox.eventId }).from(outbox).where(inArray(outbox.eventId, acceptedChunk));
      outboxMatches += queued.length;
    }
  }
  return { type: 'verified', ledgerRows: l!.n, outboxRows: o!.n, ledgerMatches, outboxMatches };
}

let stopping = false;
async function stop(code: number): Promise<never> {
  if (!stopping) {
    stopping = true;
    await Promise.race([
      (async () => {
        await app.close();
        await database?.close();
      })(),
      new Promise((resolve) => setTimeout(resolve, 10_000).unref()),
    ]);
  }
  process.exit(code);
}

process.on('message', (message: ParentMessage) => {
  if (message.type === 'stop') void stop(0);
  else if (message.type === 'verify') {
    verify(message).then(send, (err: unknown) => send({ type: 'failed', message: String(err) }));
  }
});
process.on('disconnect', () => void stop(1));
process.on('SIGTERM', () => void stop(0));
setTimeout(() => void stop(1), MAX_LIFETIME_MS).unref();

const address = await app.listen({ host: '127.0.0.1', port: 0 });
send({ type: 'listening', url: address });
// Run by hand (e.g. under --cpu-prof), there is no IPC channel: say where to send load.
if (!process.send) process.stderr.write(`listening on ${address}\n`);
