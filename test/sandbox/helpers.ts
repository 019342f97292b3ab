import { startSandbox } from '../../src/sandbox/index.js';
import type { Sandbox, SandboxOptions } from '../../src/sandbox/index.js';

export interface Harness {
  sb: Sandbox;
  token: string;
  /** GET/POST/... against the sandbox with the harness's bearer token. */
  api(path: string, init?: RequestInit & { token?: string | null }): Promise<Response>;
  json<T = any>(path: string, init?: RequestInit & { token?: string | null }): Promise<T>;
}

export async function startHarness(opts: SandboxOptions = {}): Promise<Harness> {
  const sb = await startSandbox({ records: 100, ...opts });
  const token = sb.state.issueToken().access_token;
  const api = (path: string, init: RequestInit & { token?: string | null } = {}): Promise<Response> => {
    const { token: override, headers, ...rest } = init;
    const t = override === undefined ? token : override;
    const h: Record<string, string> = { ...(headers as Record<string, string> | undefined) };
    if (t !== null) h.authorization = `Bearer ${t}`;
    if (rest.body !== undefined && !h['content-type']) h['content-type'] = 'application/json';
    return fetch(path.startsWith('http') ? path : `${sb.url}${path}`, { ...rest, headers: h });
  };
  const json = async <T,>(path: string, init?: RequestInit & { token?: string | null }): Promise<T> => {
    const res = await api(path, init);
    if (!res.ok) throw new Error(`${res.status} ${await res.text()}`);
    return (await res.json()) as T;
  };
  return { sb, token, api, json };
}

export function form(body: Record<string, string>): RequestInit {
  return { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams(body).toString() };
}

export const CLIENT = { client_id: 'sandbox-client', client_secret: 'sandbox-secret' };

/** Follows meta.paging.next to the end; returns every page. */
export async function allPages(h: Harness, firstPath: string, max = 10_000): Promise<any[]> {
  const pages: any[] = [];
  let next: string | undefined = firstPath;
  while (next && pages.length < max) {
    const page: any = await h.json(next);
    pages.push(page);
    next = page.meta?.paging?.next;
  }
  return pages;
}

/** Response bodies in these tests are checked field by field, so they are read untyped. */
export async function readJson(res: Response): Promise<any> {
  return res.json();
}
