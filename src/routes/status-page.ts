import type { FastifyInstance } from 'fastify';
import { countChangesPerMinute, countHookAccepted, listRecentEvents, type MinuteBucket, type RecentEvent } from '../db/queries/activity.js';
import { reauthHint } from '../crm/token-provider.js';
import { healthReport } from './health.js';
import { heldText } from '../sync/poller.js';

/**
 * `GET /`: the operator's status page. Server-rendered from the same report as /health plus
 * the ledger's keys, sources and dispositions; it never reads a record body, so no client's
 * name, email or phone number can reach it (issue 9). Behind the admin credential, and it
 * reloads itself so it can stay open on a screen.
 */

const REFRESH_SECONDS = 15;
const WINDOW_MINUTES = 60;
const RECENT_EVENTS = 30;
/** The chart's series; notification-mode hooks count with hooks, the bridge's own writes apart. */
const SERIES = [
  { key: 'hook', label: 'hook', colour: '#2f6fdf', sources: ['hook', 'notification'] },
  { key: 'poll', label: 'poll', colour: '#e08a1e', sources: ['poll'] },
  { key: 'sweep', label: 'sweep', colour: '#8a4fd0', sources: ['sweep'] },
  { key: 'outbound', label: 'outbound', colour: '#7a8a99', sources: ['outbound'] },
] as const;

export default async function statusPageRoutes(app: FastifyInstance) {
  const startedAt = performance.now();
  app.get(
    '/',
    {
      onRequest: app.requireAdmin,
      schema: {
        summary: 'Status page for operators (HTML; admin bearer or basic login with ADMIN_TOKEN as the password)',
        tags: ['operations'],
        security: [{ admin: [] }, { adminBasic: [] }],
      },
    },
    async (_request, reply) => {
      const now = new Date();
      // The health report first: it answers "database down" within its check's timeout, and then
      // the page says so instead of failing with a 500 on the activity queries (or waiting for
      // Postgres's connect timeout), which is when the operator most needs it.
      const health = await healthReport(app, startedAt);
      const [buckets, events, hookAccepted] =
        health.body.status === 'down'
          ? [[], null, new Map<string, number>()]
          : await Promise.all([
              countChangesPerMinute(app.db, { since: new Date(now.getTime() - WINDOW_MINUTES * 60_000) }),
              listRecentEvents(app.db, { limit: RECENT_EVENTS }),
              countHookAccepted(app.db),
            ]);
      return reply
        .type('text/html; charset=utf-8')
        .header('cache-control', 'no-store')
        .header('content-security-policy', "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'")
        .send(renderStatusPage({ now, health: health.body, healthy: health.code === 200, buckets, events, hookAccepted }));
    },
  );
}

type HealthBody = Awaited<ReturnType<typeof healthReport>>['body'];
type ConnectionReport = HealthBody['connections'][number];

interface PageData {
  now: Date;
  health: HealthBody;
  healthy: boolean;
  buckets: MinuteBucket[];
  /** null: the database is down, so the latest changes cannot be read. */
  events: RecentEvent[] | null;
  hookAccepted: Map<string, number>;
}

export function escapeHtml(value: unknown): string {
  return String(value).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c] ?? c);
}

/** "42s", "7m", "3h 5m", "2d": short enough for a table cell. */
export function formatAge(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m`;
  const h = Math.floor(m / 60);
  if (h < 48) return m % 60 ? `${h}h ${m % 60}m` : `${h}h`;
  return `${Math.floor(h / 24)}d`;
}

function when(iso: string | null | undefined, now: Date, never = 'never'): string {
  if (!iso) return `<span class="muted">${escapeHtml(never)}</span>`;
  const age = formatAge(now.getTime() - Date.parse(iso));
  return `<time datetime="${escapeHtml(iso)}" title="${escapeHtml(iso)}">${escapeHtml(age)} ago</time>`;
}

function badge(text: string, tone: 'ok' | 'warn' | 'bad' | 'muted'): string {
  return `<span class="badge ${tone}">${escapeHtml(text)}</span>`;
}

function hasReport(c: ConnectionReport): c is Extract<ConnectionReport, { auth: unknown }> {
  return 'auth' in c;
}

function renderConnection(c: ConnectionReport, data: PageData): string {
  if (!hasReport(c)) {
    return `<section class="card" aria-label="connection ${escapeHtml(c.id)}"><h2>${escapeHtml(c.id)}</h2><p>${badge('database down', 'bad')}</p></section>`;
  }
  const neverAuthorised = 'reason' in c.auth && c.auth.reason === 'never_authorised';
  const authTone = c.auth.state === 'ok' ? 'ok' : c.auth.state === 'needs_reauth' ? 'bad' : 'muted';
  const authText = neverAuthorised ? 'not authorised yet' : c.auth.state === 'needs_reauth' ? 'needs re-authorisation' : c.auth.state === 'none' ? 'no CRM auth' : 'authorised';
  const poll = 'poll' in c ? c.poll : undefined;
  const caught = 'caughtByPoll' in c ? (c.caughtByPoll ?? 0) : 0;
  const announced = data.hookAccepted.get(c.id) ?? 0;
  const missRate = caught + announced === 0 ? null : caught / (caught + announced);
  const pollCell = poll
    ? `${when(poll.lastSuccessAt, data.now)}${poll.stale ? ` ${badge('stale', 'bad')}` : ''}${poll.lastError ? `<div class="muted small">last error: ${escapeHtml(poll.lastError)}</div>` : ''}`
    : '<span class="muted">not polled (hooks only)</span>';
  const reauth =
    c.auth.state === 'needs_reauth'
      ? `<p class="alert">${neverAuthorised ? 'Authorise' : 'Re-authorise'}: ${escapeHtml(reauthHint(c.id, c.auth.type)).replace(/`([^`]+)`/g, '<code>$1</code>')}.</p>`
      : '';
  const held = (poll?.streams ?? [])
    .filter((s) => s.sweepHeld !== null)
    .map((s) => `<p class="alert">Sweep of ${escapeHtml(s.object)}: ${escapeHtml(heldText(s.sweepHeld!, c.id, s.object))}.</p>`)
    .join('');
  return `<section class="card" aria-label="connection ${escapeHtml(c.id)}">
  <h2>${escapeHtml(c.id)} ${badge(authText, authTone)}</h2>
  ${reauth}${held}
  <dl class="facts">
    <div><dt>Last successful poll</dt><dd data-fact="last-poll">${pollCell}</dd></div>
    <div><dt>Last hook</dt><dd data-fact="last-hook">${when(c.hooks.lastReceivedAt, data.now)}</dd></div>
    <div><dt>Pending deliveries</dt><dd data-fact="pending">${escapeHtml(c.delivery.pending)}${c.delivery.oldestPendingAgeSeconds !== null ? ` <span class="muted small">oldest ${escapeHtml(formatAge(c.delivery.oldestPendingAgeSeconds * 1000))}</span>` : ''}${c.delivery.degraded ? ` ${badge('backlog', 'bad')}` : ''}</dd></div>
    <div><dt>Dead letters</dt><dd data-fact="dead">${c.delivery.deadLetters > 0 ? badge(String(c.delivery.deadLetters), 'bad') : '0'}</dd></div>
    <div><dt>Caught by poll</dt><dd data-fact="caught-by-poll">${escapeHtml(caught)}${missRate === null ? '' : ` <span class="muted small">automation missed ${escapeHtml((missRate * 100).toFixed(1))}%</span>`}</dd></div>
  </dl>
  ${renderChart(c.id, data)}
</section>`;
}

/** Changes per minute by source over the last hour, as stacked bars in inline SVG. */
function renderChart(connectionId: string, data: PageData): string {
  const end = Math.floor(data.now.getTime() / 60_000) * 60_000;
  const start = end - (WINDOW_MINUTES - 1) * 60_000;
  const perMinute = Array.from({ length: WINDOW_MINUTES }, () => new Map<string, number>());
  const totals = new Map<string, number>();
  for (const b of data.buckets) {
    if (b.connectionId !== connectionId) continue;
    const index = Math.round((b.minute.getTime() - start) / 60_000);
    const series = SERIES.find((s) => (s.sources as readonly string[]).includes(b.source));
    if (series === undefined || index < 0 || index >= WINDOW_MINUTES) continue;
    const minute = perMinute[index]!;
    minute.set(series.key, (minute.get(series.key) ?? 0) + b.changes);
    totals.set(series.key, (totals.get(series.key) ?? 0) + b.changes);
  }
  const peak = Math.max(1, ...perMinute.map((m) => [...m.values()].reduce((a, b) => a + b, 0)));
  const width = 600;
  const height = 120;
  const slot = width / WINDOW_MINUTES;
  const bars: string[] = [];
  perMinute.forEach((minute, i) => {
    let y = height;
    for (const s of SERIES) {
      const n = minute.get(s.key) ?? 0;
      if (n === 0) continue;
      const h = Math.max(1, (n / peak) * (height - 4));
      y -= h;
      const at = new Date(start + i * 60_000).toISOString().slice(11, 16);
      bars.push(`<rect class="bar" data-source="${s.key}" x="${(i * slot + 1).toFixed(1)}" y="${y.toFixed(1)}" width="${(slot - 2).toFixed(1)}" height="${h.toFixed(1)}" fill="${s.colour}"><title>${at} UTC: ${n} ${s.label}</title></rect>`);
    }
  });
  const legend = SERIES.map((s) => `<span class="legend"><i style="background:${s.colour}"></i>${s.label} ${escapeHtml(totals.get(s.key) ?? 0)}</span>`).join(' ');
  return `<figure class="chart">
    <figcaption>Changes per minute by source, last hour <span class="muted small">(peak ${peak}/min)</span></figcaption>
    <svg role="img" aria-label="Changes per minute by source over the last hour for ${escapeHtml(connectionId)}" viewBox="0 0 ${width} ${height + 14}" width="100%" preserveAspectRatio="none">
      <line x1="0" y1="${height}" x2="${width}" y2="${height}" stroke="#c9d1da"/>
      ${bars.join('\n      ')}
      <text x="0" y="${height + 12}" font-size="10" fill="#6b7785">-60m</text>
      <text x="${width}" y="${height + 12}" font-size="10" fill="#6b7785" text-anchor="end">now</text>
    </svg>
    <div class="legends">${legend}</div>
  </figure>`;
}

function renderEvents(events: RecentEvent[] | null, now: Date): string {
  if (events === null) return '<p class="muted">The database is down: the latest changes cannot be read.</p>';
  if (events.length === 0) return '<p class="muted">No changes recorded yet.</p>';
  const tone = (d: string) => (d === 'accepted' ? 'ok' : d === 'stale' || d === 'echo' ? 'warn' : 'muted');
  const rows = events
    .map(
      (e) => `<tr>
      <td>${when(e.receivedAt.toISOString(), now)}</td>
      <td>${escapeHtml(e.connectionId)}</td>
      <td>${escapeHtml(e.object)}</td>
      <td class="mono">${escapeHtml(e.crmId)}</td>
      <td>${escapeHtml(e.change)}</td>
      <td>${escapeHtml(e.source)}</td>
      <td>${badge(e.disposition, tone(e.disposition))}</td>
      <td class="mono small" title="${escapeHtml(e.eventId)}">${escapeHtml(e.eventId.slice(0, 8))}</td>
    </tr>`,
    )
    .join('');
  return `<table class="events">
    <caption>Latest changes</caption>
    <thead><tr><th>When</th><th>Connection</th><th>Object</th><th>CRM id</th><th>Change</th><th>Source</th><th>Disposition</th><th>Event</th></tr></thead>
    <tbody>${rows}</tbody>
  </table>`;
}

export function renderStatusPage(data: PageData): string {
  const status = data.health.status;
  const tone = status === 'ok' ? 'ok' : status === 'degraded' ? 'warn' : 'bad';
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="${REFRESH_SECONDS}">
<title>crm-bridge status</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f4f6f8; color: #1d2733; }
  header { background: #1d2733; color: #fff; padding: 12px 24px; display: flex; align-items: center; gap: 16px; }
  header h1 { font-size: 18px; margin: 0; font-weight: 600; }
  header .muted { color: #aab6c3; }
  main { padding: 16px 24px; max-width: 1100px; }
  .card { background: #fff; border: 1px solid #dde3ea; border-radius: 6px; padding: 12px 16px; margin-bottom: 16px; }
  .card h2 { font-size: 16px; margin: 0 0 8px; }
  .facts { display: grid; grid-template-columns: repeat(5, 1fr); gap: 8px; margin: 0 0 8px; }
  .facts dt { color: #6b7785; font-size: 12px; }
  .facts dd { margin: 0; font-size: 15px; }
  .badge { display: inline-block; padding: 1px 7px; border-radius: 10px; font-size: 12px; font-weight: 600; }
  .badge.ok { background: #dff3e4; color: #1c6b34; } .badge.warn { background: #fdf0d5; color: #8a5a00; }
  .badge.bad { background: #fbe0e0; color: #a11d1d; } .badge.muted { background: #e9edf1; color: #4d5966; }
  .muted { color: #6b7785; } .small { font-size: 12px; } .mono { font-family: ui-monospace, monospace; }
  .alert { background: #fbe0e0; padding: 6px 10px; border-radius: 4px; }
  .chart { margin: 0; } .chart figcaption { font-size: 12px; color: #4d5966; margin-bottom: 4px; }
  .chart svg { height: 134px; background: #fafbfc; border: 1px solid #eef1f4; }
  .legends { font-size: 12px; margin-top: 4px; } .legend { margin-right: 12px; }
  .legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; border-radius: 2px; vertical-align: -1px; }
  table.events { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid #dde3ea; }
  table.events caption { text-align: left; font-weight: 600; padding: 8px 0; }
  table.events th, table.events td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eef1f4; font-size: 13px; }
  table.events th { background: #f0f3f6; font-weight: 600; }
</style>
</head>
<body>
<header><h1>crm-bridge</h1>${badge(status, tone)}<span class="muted small">updated ${escapeHtml(data.now.toISOString().replace('T', ' ').slice(0, 19))} UTC · refreshes every ${REFRESH_SECONDS}s · <a style="color:#aab6c3" href="/health">/health</a> · <a style="color:#aab6c3" href="/metrics">/metrics</a> · <a style="color:#aab6c3" href="/docs">/docs</a></span></header>
<main>
${data.health.connections.map((c) => renderConnection(c, data)).join('\n')}
${renderEvents(data.events, data.now)}
</main>
</body>
</html>`;
}
