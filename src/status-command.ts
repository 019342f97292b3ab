import { pino } from 'pino';
import { buildApp } from './app.js';
import { loadConfig } from './config/load.js';
import type { AuthConfig } from './config/schema.js';
import { reauthHint } from './crm/token-provider.js';
import { healthReport } from './routes/health.js';

export interface StatusOptions {
  /** A running bridge to ask (`GET <url>/health`); otherwise the app is built here on the configured database. */
  url?: string | undefined;
  print: (text: string) => void;
  now?: Date;
}

interface ConnectionRow {
  id: string;
  auth?: { state: string; type?: AuthConfig['type'] };
  hooks?: { lastReceivedAt: string | null };
  delivery?: { pending: number; deadLetters: number; degraded?: boolean };
  poll?: { lastSuccessAt: string | null; stale: boolean; lastError: string | null; heldDeletes?: number };
  caughtByPoll?: number;
}

interface HealthAnswer {
  status: string;
  checks?: { db?: { status: string; error?: string } };
  connections: ConnectionRow[];
}

/**
 * `crm-bridge status`: what /health says, as a table. Without --url it builds the app (same
 * config and database as the server) and calls the same report function as the route.
 * Exit status 0 when healthy, 1 when /health would answer 503.
 */
export async function runStatusCommand(options: StatusOptions): Promise<number> {
  let answer: HealthAnswer;
  let code: number;
  if (options.url !== undefined) {
    const url = new URL('/health', options.url);
    const res = await fetch(url, { signal: AbortSignal.timeout(10_000) }).catch((err: Error) => {
      throw new Error(`cannot reach ${url.origin}: ${(err.cause as Error | undefined)?.message ?? err.message}`);
    });
    if (res.status !== 200 && res.status !== 503) throw new Error(`${url} answered HTTP ${res.status}, not a crm-bridge health report`);
    answer = (await res.json()) as HealthAnswer;
    code = res.status;
  } else {
    const config = loadConfig();
    const app = await buildApp({ config, loggerInstance: pino({ level: 'silent' }) });
    try {
      const report = await healthReport(app, performance.now());
      answer = report.body as HealthAnswer;
      code = report.code;
    } finally {
      await app.close();
    }
  }
  options.print(formatStatus(answer, options.now ?? new Date()));
  return code === 200 ? 0 : 1;
}

export function formatStatus(answer: HealthAnswer, now: Date): string {
  const ago = (iso: string | null | undefined) => (iso ? `${age(now.getTime() - Date.parse(iso))} ago` : 'never');
  const header = ['connection', 'auth', 'last poll', 'last hook', 'pending', 'dead', 'caught by poll', 'state'];
  const rows = answer.connections.map((c) => {
    const problems = [
      // A bridge from before /health named the auth type gave the oauth2 hint for every connection.
      c.auth?.state === 'needs_reauth' ? reauthHint(c.id, c.auth.type ?? 'oauth2') : '',
      c.poll?.stale ? 'poll stale' : '',
      c.poll?.lastError ? `poll error: ${c.poll.lastError}` : '',
      c.poll?.heldDeletes ? `${c.poll.heldDeletes} delete(s) held by the sweep (/health streams[].sweepHeld)` : '',
      c.delivery?.degraded ? 'delivery backlog' : '',
      (c.delivery?.deadLetters ?? 0) > 0 ? 'dead letters' : '',
    ].filter(Boolean);
    return [
      c.id,
      c.auth?.state ?? '?',
      c.poll ? ago(c.poll.lastSuccessAt) : 'not polled',
      ago(c.hooks?.lastReceivedAt),
      String(c.delivery?.pending ?? '?'),
      String(c.delivery?.deadLetters ?? '?'),
      c.caughtByPoll === undefined ? '-' : String(c.caughtByPoll),
      problems.length ? problems.join('; ') : 'ok',
    ];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => cells.map((cell, i) => cell.padEnd(widths[i]!)).join('  ').trimEnd();
  const db = answer.checks?.db;
  return [
    `crm-bridge: ${answer.status}${db ? ` (database ${db.status}${db.error ? `: ${db.error}` : ''})` : ''}`,
    line(header),
    line(widths.map((w) => '-'.repeat(w))),
    ...rows.map(line),
    '',
  ].join('\n');
}

function age(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 172_800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86_400)}d`;
}
