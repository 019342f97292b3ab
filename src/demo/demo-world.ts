import { randomBytes } from 'node:crypto';
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import { DEFAULT_CLIENT, startSandbox, type Sandbox } from '../sandbox/index.js';

/**
 * What `npm start` runs without a connections file: a whole firm in one process. The sandbox
 * CRM (Clio dialect) with realistic lies on, staff editing it, a demo intake pipeline that logs
 * what it receives and now and then writes a new lead back, and a bridge connection wired to
 * both. Everything listens on 127.0.0.1 only.
 */
export interface DemoWorld {
  sandbox: Sandbox;
  pipelineUrl: string;
  hookSecret: string;
  /** The connections file the bridge runs with, as data. */
  connections: unknown[];
  /** Once the bridge listens: authorise it, point the CRM's automation at it, start the staff. */
  start(bridge: FastifyInstance, bridgeUrl: string): Promise<void>;
  close(): Promise<void>;
}

// The lies a real Clio deployment shows, dialled so the log has something to tell every minute.
const DEMO_SWITCHES = {
  automationDropRate: 0.2,
  automationDuplicateRate: 0.05,
  // Access tokens claim 7 days and die after 45 s; refresh tokens rotate.
  tokenRealLifetimeSeconds: 45,
  rotateRefreshTokens: true,
  clockSkewSeconds: 7,
} as const;

const FIRST_NAMES = ['Maria', 'James', 'Aisha', 'Tom', 'Lena', 'Omar', 'Grace', 'Diego', 'Hannah', 'Kenji'];
const LAST_NAMES = ['Alvarez', 'Brooks', 'Chen', 'Dubois', 'Evans', 'Fischer', 'Gupta', 'Haddad', 'Ito', 'Jensen'];
const NOTES = [
  'Client called: wants an update on the insurer’s offer',
  'Medical records received from the clinic',
  'Opposing counsel asked for an extension',
  'Intake call completed; conflict check clear',
  'Deposition scheduled; client informed',
  'Settlement demand letter sent',
];

/** `logger` is the process's: the demo names its two parts (`demo`, `demo-pipeline`) beside it, not under one another. */
export async function startDemoWorld(logger: FastifyBaseLogger, hookSecret: string): Promise<DemoWorld> {
  const log = logger.child({ component: 'demo' });
  const pipelineLog = logger.child({ component: 'demo-pipeline' });
  const sandbox = await startSandbox({ records: 200, seed: 42, switches: DEMO_SWITCHES, autoApprove: true });
  const pipelineKey = randomBytes(18).toString('base64url');
  const pipeline = await startDemoPipeline(pipelineLog);
  const timers: NodeJS.Timeout[] = [];

  const connections = [
    {
      id: 'demo',
      connector: 'clio',
      baseUrl: sandbox.url,
      auth: {
        type: 'oauth2',
        clientId: DEFAULT_CLIENT.clientId,
        clientSecret: DEFAULT_CLIENT.clientSecret,
        tokenUrl: '/oauth/token',
        authorizeUrl: '/oauth/authorize',
        refreshMarginSeconds: 10,
      },
      inbound: { secrets: [hookSecret], recordPath: 'data', object: 'matters', deleteWhen: { path: 'meta.event', equals: ['deleted'] } },
      poll: { objects: ['matters', 'contacts'], interval: '20s', lookback: '2m', sweepInterval: '3m', pageSize: 100 },
      downstream: { url: `${pipeline.url}/intake`, headers: { Authorization: `Bearer ${pipelineKey}` }, backoff: { base: '1s', max: '30s' } },
      outbound: { apiKeys: [pipelineKey] },
    },
  ];

  return {
    sandbox,
    pipelineUrl: pipeline.url,
    hookSecret,
    connections,
    async start(bridge, bridgeUrl) {
      await authorise(bridge);
      for (const object of ['matters', 'contacts'] as const) {
        sandbox.state.addAutomationRule({
          object,
          events: ['created', 'updated', 'deleted'],
          url: `${bridgeUrl}/hooks/demo?object=${object}`,
          auth: { type: 'bearer', value: hookSecret },
          payload: 'record',
        });
      }
      timers.push(setInterval(() => staffActivity(sandbox, log), 2_500).unref());
      // The intake agent qualifies a lead now and then and writes it into the CRM through the bridge.
      let leads = 0;
      timers.push(
        setInterval(() => {
          writeNewLead(bridgeUrl, pipelineKey, sandbox, ++leads, pipelineLog).catch((err: unknown) =>
            log.warn({ err }, 'the demo pipeline could not write its lead'),
          );
        }, 15_000).unref(),
      );
    },
    async close() {
      for (const timer of timers) clearInterval(timer);
      await sandbox.state.automationIdle();
      await pipeline.app.close();
      await sandbox.close();
    },
  };
}

/** The operator's first step, done for them: the OAuth consent (auto-approved in the sandbox). */
async function authorise(bridge: FastifyInstance): Promise<void> {
  const manager = bridge.tokens.manager('demo');
  if (manager === undefined) throw new Error('the demo connection has no token manager');
  const redirectUri = 'http://127.0.0.1/oauth/demo/callback';
  const consent = await fetch(manager.authorizationUrl({ state: 'demo', redirectUri }), { redirect: 'manual' });
  const code = new URL(consent.headers.get('location') ?? 'http://x/').searchParams.get('code');
  if (!code) throw new Error(`the sandbox CRM did not grant consent (${consent.status})`);
  await manager.exchangeCode(code, redirectUri);
  // The first poll ran before there was a token: poll now rather than at the next interval.
  bridge.poller.wake('demo');
}

/** Staff at the firm: mostly edits, sometimes a new matter, now and then a deletion. */
function staffActivity(sandbox: Sandbox, log: FastifyBaseLogger): void {
  const { state } = sandbox;
  const matters = state.store.matters.items;
  const pick = <T>(items: readonly T[]): T | undefined => items[Math.floor(Math.random() * items.length)];
  try {
    const roll = Math.random();
    if (roll < 0.7 && matters.length > 0) {
      const matter = pick(matters)!;
      state.updateRecord('matters', matter.id, { description: `${pick(NOTES)} (${new Date().toLocaleTimeString('en-GB')})` });
    } else if (roll < 0.9) {
      const client = pick(state.store.contacts.items);
      if (client) state.createRecord('matters', { description: `New intake: ${pick(NOTES)}`, status: 'open', client: { id: client.id } });
    } else if (roll < 0.95 && matters.length > 50) {
      state.deleteRecord('matters', pick(matters)!.id);
    } else {
      const contact = pick(state.store.contacts.items);
      if (contact) state.updateRecord('contacts', contact.id, { title: pick(['Ms.', 'Mr.', 'Dr.', 'Mx.']) });
    }
  } catch (err) {
    log.debug({ err }, 'demo staff activity skipped a step');
  }
}

/**
 * The intake pipeline's stand-in: accepts deliveries idempotently (by Idempotency-Key) and logs
 * them in plain words.
 */
async function startDemoPipeline(log: FastifyBaseLogger): Promise<{ app: FastifyInstance; url: string }> {
  const app = Fastify({ logger: false });
  const seen = new Set<string>();
  // A first poll delivers the whole CRM at once: say so in one line, not hundreds.
  let burst: string[] = [];
  const flush = setInterval(() => {
    if (burst.length === 0) return;
    if (burst.length <= 3) for (const line of burst) log.info(`pipeline received ${line}`);
    else log.info(`pipeline received ${burst.length} changes in a second: ${burst.slice(0, 2).join(', ')}, ...`);
    burst = [];
  }, 1_000).unref();
  app.addHook('onClose', async () => clearInterval(flush));
  app.post('/intake', async (request, reply) => {
    const key = String(request.headers['idempotency-key'] ?? '');
    if (seen.has(key)) return reply.code(200).send({ status: 'already applied' });
    seen.add(key);
    const change = request.body as { object: string; crmId: string; change: string; source: string };
    burst.push(`${change.change} of ${change.object} ${change.crmId} (via ${change.source})`);
    return reply.code(202).send({ status: 'queued' });
  });
  const url = await app.listen({ port: 0, host: '127.0.0.1' });
  return { app, url };
}

/** What an intake agent does once it has qualified a caller: open a matter in the CRM. */
async function writeNewLead(bridgeUrl: string, apiKey: string, sandbox: Sandbox, n: number, log: FastifyBaseLogger): Promise<void> {
  const pick = <T>(items: readonly T[]): T => items[Math.floor(Math.random() * items.length)]!;
  const client = pick(sandbox.state.store.contacts.items);
  const name = `${pick(FIRST_NAMES)} ${pick(LAST_NAMES)}`;
  const externalId = `intake-${Date.now().toString(36)}-${n}`;
  const res = await fetch(`${bridgeUrl}/v1/connections/demo/records`, {
    method: 'POST',
    headers: { authorization: `Bearer ${apiKey}`, 'idempotency-key': externalId, 'content-type': 'application/json' },
    body: JSON.stringify({ object: 'matters', externalId, fields: { description: `Web intake: ${name}, ${pick(NOTES).toLowerCase()}`, status: 'Open', clientId: client.id } }),
  });
  log.info(`pipeline wrote a new lead into the CRM through the bridge (${externalId}): ${res.status}`);
}
