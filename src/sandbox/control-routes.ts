// The control API under /_sandbox: what a person at the CRM (or a test harness) does. Never rate
// limited, never faulted, never logged in the request log, and not authenticated: enable it
// only where the sandbox is a test tool.
import type { FastifyInstance, FastifyReply } from 'fastify';
import { z } from 'zod';
import { SandboxWriteError } from './state.js';
import type { SandboxState } from './state.js';

const objectSchema = z.enum(['matters', 'contacts']);
const bulkImportSchema = z
  .object({ object: objectSchema, count: z.number().int().min(1).max(1_000_000), updatedAt: z.string().optional(), fireAutomation: z.boolean().optional() })
  .strict();
const clockSchema = z.object({ skewSeconds: z.number().optional(), advanceSeconds: z.number().optional(), frozen: z.boolean().optional() }).strict();
const grantSchema = z.object({ grantId: z.string().optional() }).strict();
const issueSchema = z.object({ clientId: z.string().optional() }).strict();

function fail(reply: FastifyReply, err: unknown): FastifyReply {
  if (err instanceof SandboxWriteError) return reply.code(err.status).send({ error: { type: err.type, message: err.message } });
  if (err instanceof z.ZodError) return reply.code(400).send({ error: { type: 'BadRequest', message: z.prettifyError(err) } });
  throw err;
}

const stripUndefined = <T extends object>(o: T): { [K in keyof T]: Exclude<T[K], undefined> } =>
  Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as { [K in keyof T]: Exclude<T[K], undefined> };

function recordData(body: unknown): Record<string, unknown> {
  // Accept the API's {"data": {...}} envelope or the bare object.
  if (typeof body !== 'object' || body === null) return {};
  const data = (body as { data?: unknown }).data;
  return (typeof data === 'object' && data !== null ? data : body) as Record<string, unknown>;
}

export async function controlRoutes(app: FastifyInstance, opts: { state: SandboxState }): Promise<void> {
  const { state } = opts;

  app.get('/', async () => ({
    url: state.url,
    documentedUrl: `${state.url}/documented`,
    seed: state.seed,
    counts: { matters: state.store.matters.size, contacts: state.store.contacts.size, practice_areas: state.store.practiceAreas.size },
    clock: state.clockInfo(),
    switches: state.switches,
    clients: [...state.oauth.clients.keys()],
  }));

  app.get<{ Params: { object: string; id: string } }>('/records/:object/:id', async (req, reply) => {
    try {
      const object = objectSchema.parse(req.params.object);
      const rec = state.renderFull(object, Number(req.params.id));
      return rec ? { data: rec } : reply.code(404).send({ error: { type: 'RecordNotFound', message: 'not found' } });
    } catch (err) {
      return fail(reply, err);
    }
  });

  /** All ids of an object, for tests that check a sweep against the truth. */
  app.get<{ Params: { object: string } }>('/records/:object/ids', async (req, reply) => {
    try {
      const object = objectSchema.parse(req.params.object);
      return { ids: state.store[object].items.map((r) => r.id) };
    } catch (err) {
      return fail(reply, err);
    }
  });

  app.post<{ Params: { object: string } }>('/records/:object', async (req, reply) => {
    try {
      const object = objectSchema.parse(req.params.object);
      const rec = state.createRecord(object, recordData(req.body));
      return reply.code(201).send({ data: state.renderFull(object, rec.id) });
    } catch (err) {
      return fail(reply, err);
    }
  });

  app.patch<{ Params: { object: string; id: string } }>('/records/:object/:id', async (req, reply) => {
    try {
      const object = objectSchema.parse(req.params.object);
      const rec = state.updateRecord(object, Number(req.params.id), recordData(req.body));
      return { data: state.renderFull(object, rec.id) };
    } catch (err) {
      return fail(reply, err);
    }
  });

  app.delete<{ Params: { object: string; id: string } }>('/records/:object/:id', async (req, reply) => {
    try {
      state.deleteRecord(objectSchema.parse(req.params.object), Number(req.params.id));
      return reply.code(204).send();
    } catch (err) {
      return fail(reply, err);
    }
  });

  app.post('/bulk-import', async (req, reply) => {
    try {
      return state.bulkImport(stripUndefined(bulkImportSchema.parse(req.body)));
    } catch (err) {
      return fail(reply, err);
    }
  });

  app.get('/switches', async () => state.switches);
  app.patch('/switches', async (req, reply) => {
    try {
      return state.setSwitches((req.body ?? {}) as Record<string, unknown>);
    } catch (err) {
      return fail(reply, err);
    }
  });
  app.post('/switches/reset', async () => state.resetSwitches());

  app.get('/clock', async () => state.clockInfo());
  app.post('/clock', async (req, reply) => {
    try {
      return state.setClock(stripUndefined(clockSchema.parse(req.body ?? {})));
    } catch (err) {
      return fail(reply, err);
    }
  });

  app.get('/requests', async (req) => {
    const q = req.query as Record<string, string | undefined>;
    const entries = state.requestLog.list(
      stripUndefined({
        since: q.since === undefined ? undefined : Number(q.since),
        method: q.method,
        pathPrefix: q.path,
        limit: q.limit === undefined ? undefined : Number(q.limit),
      }),
    );
    return { lastSeq: state.requestLog.lastSeq, requests: entries };
  });
  app.delete('/requests', async (_req, reply) => {
    state.requestLog.clear();
    return reply.code(204).send();
  });

  app.get('/automation-log', async (req) => {
    const q = req.query as Record<string, string | undefined>;
    if (q.wait === 'idle') await state.automationIdle();
    return { entries: state.automation.entries(q.since === undefined ? 0 : Number(q.since)) };
  });
  app.delete('/automation-log', async (_req, reply) => {
    state.automation.clearLog();
    return reply.code(204).send();
  });

  app.get('/automation/rules', async () => ({ rules: state.automation.rules }));
  app.post('/automation/rules', async (req, reply) => {
    try {
      return reply.code(201).send(state.addAutomationRule(req.body as never));
    } catch (err) {
      return fail(reply, err);
    }
  });
  app.delete<{ Params: { id: string } }>('/automation/rules/:id', async (req, reply) =>
    state.automation.removeRule(req.params.id) ? reply.code(204).send() : reply.code(404).send({ error: { type: 'NotFound', message: 'no such rule' } }),
  );

  app.get('/tokens', async () => ({ grants: state.oauth.listGrants() }));
  app.post('/tokens/issue', async (req, reply) => {
    try {
      const { clientId } = issueSchema.parse(req.body ?? {});
      return reply.code(201).send(state.issueToken(clientId));
    } catch (err) {
      return fail(reply, err);
    }
  });
  app.post('/tokens/revoke', async (req, reply) => {
    try {
      const { grantId } = grantSchema.parse(req.body ?? {});
      return { revoked: state.revokeTokens(grantId) };
    } catch (err) {
      return fail(reply, err);
    }
  });
  app.post('/tokens/expire', async (req, reply) => {
    try {
      const { grantId } = grantSchema.parse(req.body ?? {});
      return { expired: state.expireAccessTokens(grantId) };
    } catch (err) {
      return fail(reply, err);
    }
  });
}
