// The soak's intake pipeline, in its own process: answers every delivery 200 and remembers, per
// Idempotency-Key, how often it came and which change it carried. `GET /_summary` hands that back.
// Run as `node --import tsx soak/sink.ts <port>`; it prints `listening` once it accepts.
import { createServer } from 'node:http';

interface Seen {
  count: number;
  object: string;
  crmId: string;
  version: string | null;
  change: string;
  source: string;
}

const port = Number(process.argv[2] ?? 0);
const seen = new Map<string, Seen>();
let requests = 0;
let unkeyed = 0;

const server = createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/_summary') {
    const keys = [...seen].map(([key, s]) => [key, s.count, s.object, s.crmId, s.version, s.change, s.source]);
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ requests, unkeyed, keys }));
    return;
  }
  const chunks: Buffer[] = [];
  req.on('data', (c: Buffer) => chunks.push(c));
  req.on('end', () => {
    requests++;
    const key = req.headers['idempotency-key'];
    if (typeof key !== 'string' || key === '') {
      unkeyed++;
      res.writeHead(400, { 'content-type': 'application/json' }).end('{"error":"no Idempotency-Key"}');
      return;
    }
    const known = seen.get(key);
    if (known) known.count++;
    else {
      const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { object: string; crmId: string; version: string | null; change: string; source: string };
      seen.set(key, { count: 1, object: body.object, crmId: body.crmId, version: body.version, change: body.change, source: body.source });
    }
    res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
  });
});

server.listen(port, '127.0.0.1', () => process.stdout.write('listening\n'));
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
