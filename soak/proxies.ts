import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Rng } from '../src/sandbox/prng.js';

async function listen(server: Server): Promise<string> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

function close(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve());
  });
}

async function readBody(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

function parseJson<T>(body: Buffer): T | undefined {
  try {
    return JSON.parse(body.toString('utf8')) as T;
  } catch {
    return undefined;
  }
}

/** Forwards one request to `target` and resolves with its status, headers and body; rejects on a network error. */
function forward(target: string, req: IncomingMessage, body: Buffer): Promise<{ status: number; headers: Record<string, string>; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const url = new URL(req.url ?? '/', target);
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries(req.headers)) if (typeof v === 'string' && !['host', 'connection'].includes(k)) headers[k] = v;
    const out = httpRequest(url, { method: req.method, headers, timeout: 30_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const h: Record<string, string> = {};
        for (const [k, v] of Object.entries(res.headers)) if (typeof v === 'string' && !['connection', 'transfer-encoding', 'content-length'].includes(k)) h[k] = v;
        resolve({ status: res.statusCode ?? 0, headers: h, body: Buffer.concat(chunks) });
      });
      res.on('error', reject);
    });
    out.on('timeout', () => out.destroy(new Error('upstream timeout')));
    out.on('error', reject);
    out.end(body);
  });
}

const WRITE_PATH = /^\/api\/v4\/(matters|contacts)(?:\.json|\/\d+\.json)/;

/**
 * The CRM as the bridges see it: the sandbox behind a proxy that answers a seeded fraction of
 * API calls 429 with `Retry-After: 1`, the one lie the sandbox has no fault switch for (its rate
 * limit is per token and paced by the headers, so it cannot be dialled to a fraction).
 *
 * It also notes every version the bridges' writes made (`object/id/etag` of each answered create
 * and update), whether or not the bridge lived to read the answer: those are the bridges' own
 * versions, whose echoes must never be delivered, known here independently of the bridges' own
 * records (a write whose answer was lost to a timeout is settled without a version).
 */
export async function startCrmProxy(sandboxUrl: string, options: { rateLimitedRate: number; rng: Rng }) {
  let rateLimited = 0;
  let forwarded = 0;
  const written = new Set<string>();
  const server = createServer((req, res: ServerResponse) => {
    void (async () => {
      const body = await readBody(req);
      if ((req.url ?? '').startsWith('/api/') && options.rng() < options.rateLimitedRate) {
        rateLimited++;
        res.writeHead(429, { 'content-type': 'application/json', 'retry-after': '1' }).end('{"error":{"type":"RateLimited","message":"Rate limit exceeded"}}');
        return;
      }
      forwarded++;
      try {
        const answer = await forward(sandboxUrl, req, body);
        const write = (req.method === 'POST' || req.method === 'PATCH') && answer.status < 300 ? WRITE_PATH.exec(req.url ?? '') : null;
        if (write) {
          const data = parseJson<{ data?: { id?: unknown; etag?: unknown } }>(answer.body)?.data;
          if (data?.id !== undefined && data.etag !== undefined) written.add(`${write[1]}/${String(data.id)}/${String(data.etag)}`);
        }
        // Next-page URLs name the sandbox; keep the client on the proxy.
        const text = answer.body.toString('utf8').replaceAll(sandboxUrl, url);
        res.writeHead(answer.status, answer.headers).end(text);
      } catch {
        res.destroy();
      }
    })();
  });
  const url = await listen(server);
  return { url, written, stats: () => ({ rateLimited, forwarded }), close: () => close(server) };
}

/** One hook the CRM's automation sent, and what the bridge answered. */
export interface RelayedHook {
  object: string;
  crmId: string;
  version: string | null;
  event: string;
  /** The bridge's status; 0 when neither bridge could be reached. */
  status: number;
}

/**
 * The load balancer in front of the two bridges for the CRM's automation: round robin, and on a
 * refused connection (a killed bridge) the other one, as a health-checked balancer would. It
 * records every hook and the status the bridge gave, which is how the soak knows what each
 * accepted hook carried and whether a bridge ever answered a hook with a 5xx.
 */
export async function startHookRelay(bridges: () => string[]) {
  const hooks: RelayedHook[] = [];
  let next = 0;
  const server = createServer((req, res) => {
    void (async () => {
      const body = await readBody(req);
      // Unparseable, it is recorded with what is known; the bridge will refuse it.
      const record = parseJson<{ data?: { id?: unknown; etag?: unknown }; meta?: { event?: unknown } }>(body) ?? {};
      const object = new URL(req.url ?? '/', 'http://relay').searchParams.get('object') ?? '';
      const hook: RelayedHook = {
        object,
        crmId: String(record.data?.id ?? ''),
        version: typeof record.data?.etag === 'string' ? record.data.etag : null,
        event: String(record.meta?.event ?? ''),
        status: 0,
      };
      hooks.push(hook);
      const targets = bridges();
      const first = next++ % targets.length;
      for (let i = 0; i < targets.length; i++) {
        try {
          const answer = await forward(targets[(first + i) % targets.length]!, req, body);
          hook.status = answer.status;
          res.writeHead(answer.status, answer.headers).end(answer.body);
          return;
        } catch {
          // Refused or reset: try the other bridge.
        }
      }
      res.writeHead(502, { 'content-type': 'application/json' }).end('{"error":"no bridge reachable"}');
    })();
  });
  const url = await listen(server);
  return { url, hooks, close: () => close(server) };
}
