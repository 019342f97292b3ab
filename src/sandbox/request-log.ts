// What callers did to the sandbox, so tests can count refreshes, polls and retries. Bounded so a
// benchmark run cannot grow it without limit; `seq` keeps increasing across trims and clears.

export interface RequestAuth {
  scheme: 'bearer' | 'basic' | 'client' | 'none';
  /** Short ids only (`at-3`, `g-1`); the token string itself is never stored. */
  tokenId?: string;
  grantId?: string;
  clientId?: string;
  grantType?: string;
  state?: 'valid' | 'expired' | 'revoked' | 'unknown' | 'missing';
}

export interface RequestLogEntry {
  seq: number;
  at: string;
  method: string;
  path: string;
  query: Record<string, unknown>;
  auth: RequestAuth;
  /** 0 when the sandbox destroyed the socket instead of answering. */
  status: number;
  fault?: 'error' | 'reset' | 'rate_limited' | 'documented_host';
  /** The JSON body of a record create or update, as sent: what a caller asked the CRM to write. */
  body?: unknown;
}

export interface RequestLogFilter {
  since?: number;
  method?: string;
  pathPrefix?: string;
  limit?: number;
}

export class RequestLog {
  private entries: RequestLogEntry[] = [];
  private seq = 0;
  constructor(private readonly max = 100_000) {}

  add(entry: Omit<RequestLogEntry, 'seq'>): RequestLogEntry {
    const full = { seq: ++this.seq, ...entry };
    this.entries.push(full);
    if (this.entries.length > this.max) this.entries.splice(0, this.entries.length - this.max);
    return full;
  }

  list(filter: RequestLogFilter = {}): RequestLogEntry[] {
    const method = filter.method?.toUpperCase();
    const out = this.entries.filter(
      (e) =>
        (filter.since === undefined || e.seq > filter.since) &&
        (method === undefined || e.method === method) &&
        (filter.pathPrefix === undefined || e.path.startsWith(filter.pathPrefix)),
    );
    return filter.limit === undefined ? out : out.slice(0, filter.limit);
  }

  get lastSeq(): number {
    return this.seq;
  }

  clear(): void {
    this.entries = [];
  }
}
