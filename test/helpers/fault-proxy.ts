import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface FaultProxyOptions {
  /** Where requests go; may be set later with `setTarget` (the bridge needs the proxy's URL first). */
  target?: string;
  /** A status (and headers) to answer instead of forwarding (a fault the sandbox has no switch for). */
  fail?: (req: IncomingMessage, n: number) => number | { status: number; headers: Record<string, string> } | undefined;
  /**
   * Sees the CRM's answer before the client does: may hold it (await something) or answer
   * itself (drop the connection, say). Returns true when it has answered.
   */
  answer?: (req: IncomingMessage, res: ServerResponse, text: string) => Promise<boolean | void>;
}

/**
 * A real HTTP proxy in front of the sandbox CRM, for faults the sandbox has no switch for: a
 * listing that breaks off at page 3 and stays broken, a create whose answer is held until its
 * echo arrived, or lost on the way back.
 */
export async function startFaultProxy(options: FaultProxyOptions) {
  let target = options.target ?? '';
  let n = 0;
  const server = createServer(async (req, res) => {
    const failed = options.fail?.(req, ++n);
    if (failed !== undefined) {
      const { status, headers } = typeof failed === 'number' ? { status: failed, headers: {} } : failed;
      res.writeHead(status, { 'content-type': 'application/json', ...headers }).end(JSON.stringify({ error: { type: 'ServerError', message: 'injected' } }));
      return;
    }
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const headers = Object.fromEntries(Object.entries(req.headers).filter(([k]) => !['host', 'connection', 'content-length'].includes(k))) as Record<string, string>;
    const upstream = await fetch(`${target}${req.url}`, { method: req.method!, headers, ...(chunks.length ? { body: Buffer.concat(chunks) } : {}) });
    const out: Record<string, string> = {};
    upstream.headers.forEach((v, k) => {
      if (!['content-encoding', 'transfer-encoding', 'connection', 'content-length'].includes(k)) out[k] = v;
    });
    // Next-page URLs point at the sandbox; keep the client on the proxy.
    const text = (await upstream.text()).replaceAll(target, url);
    if (await options.answer?.(req, res, text)) return;
    res.writeHead(upstream.status, out).end(text);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    url,
    setTarget(next: string) {
      target = next;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/**
 * An `answer` that lets the first create (POST under `path`) reach the CRM and drops the
 * connection instead of answering it: the CRM made the record, the bridge never heard.
 */
export function loseFirstCreateAnswer(path: string): NonNullable<FaultProxyOptions['answer']> {
  let lost = 0;
  return async (req, res) => {
    if (req.method !== 'POST' || !req.url!.startsWith(path) || lost++ > 0) return false;
    res.destroy();
    return true;
  };
}
