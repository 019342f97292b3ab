import type { FastifyInstance, FastifyRequest } from 'fastify';
import { unfetchedNotifications } from '../config/schema.js';
import { UnauthorizedError, UnprocessableError } from '../errors.js';
import { logsDebug } from '../logger.js';
import type { Connection } from '../plugins/config.js';
import { redactFields } from '../privacy.js';
import { bearerToken, matchesAnySecret } from '../security.js';
import { deleteChange, type GateDisposition } from '../sync/change-gate.js';
import { getPath, observeRecord } from '../sync/record.js';

declare module 'fastify' {
  interface FastifyRequest {
    hookConnection?: Connection;
  }
}

type HookRequest = FastifyRequest<{ Params: { connection: string }; Querystring: { object?: string } }>;

/**
 * `POST /hooks/:connection`: what a CRM automation rule calls when a record changes.
 * Authentication runs before the body is read; the answer is given only after the change and
 * its outbox row have committed.
 */
export default async function hookRoutes(app: FastifyInstance) {
  const largestLimit = Math.max(1024 * 1024, ...[...app.connections.values()].map((c) => c.inbound.bodyLimit));

  app.post<{ Params: { connection: string }; Querystring: { object?: string } }>(
    '/hooks/:connection',
    {
      bodyLimit: largestLimit,
      schema: {
        params: { type: 'object', properties: { connection: { type: 'string', maxLength: 63 } }, required: ['connection'] },
        querystring: { type: 'object', properties: { object: { type: 'string', maxLength: 64 } }, additionalProperties: false },
        summary: "A CRM automation rule's POST: one changed record (or a notification with its id)",
        tags: ['hooks'],
        security: [{ hookSecret: [] }],
        body: { description: "The CRM's record (at inbound.recordPath when set); any JSON object" },
        response: {
          202: hookAnswerSchema('accepted: the change and its outbox row are committed'),
          200: hookAnswerSchema('duplicate, stale, unchanged or echo: recorded or known, not delivered'),
        },
      },
      // A valid secret is served even from an address over the auth-failure limit (see auth-rate-limit.ts).
      config: { credentialBeforeLimit: true },
      onRequest: async (request: HookRequest, reply) => {
        const connection = app.connections.get(request.params.connection);
        const header = connection?.inbound.header;
        const presented = header ? firstValue(request.headers[header]) : bearerToken(request.headers.authorization);
        if (!matchesAnySecret(presented, connection?.hookSecretHashes) || connection === undefined) {
          await app.refuseRepeatedFailures(request, reply);
          request.log.warn({ connection: request.params.connection }, 'hook rejected: missing or invalid secret');
          // The label is a configured id or "unknown", never the caller's text: no label explosion.
          app.metrics.hookAuthFailures.inc({ connection: connection === undefined ? 'unknown' : connection.id });
          throw new UnauthorizedError();
        }
        request.hookConnection = connection;
        // Each connection has its own limit; the route's limit is only the largest of them.
        request.bodyLimitOverride = connection.inbound.bodyLimit;
      },
    },
    async (request, reply) => {
      const connection = request.hookConnection!;
      const observedAt = new Date();

      const objects = connection.connector.objects;
      const object = request.query.object ?? connection.inbound.object ?? Object.keys(objects)[0]!;
      // Own keys only: `?object=__proto__` or `toString` must not find Object.prototype's members.
      const definition = Object.hasOwn(objects, object) ? objects[object] : undefined;
      if (definition === undefined) {
        throw new UnprocessableError(`Unknown object "${object}" for connection ${connection.id} (known: ${Object.keys(objects).join(', ')}).`, 'UNKNOWN_OBJECT');
      }

      // A notification nothing would fetch is refused, not stored and answered 202 to be lost.
      const unfetched = connection.inbound.payload === 'notification' ? unfetchedNotifications(connection, object) : undefined;
      if (unfetched) throw new UnprocessableError(`Notifications carry only an id, but ${unfetched} (connection ${connection.id}).`, 'NOTIFICATION_NOT_FETCHED');

      const body: unknown = request.body;
      if (body === null || typeof body !== 'object' || Array.isArray(body)) {
        throw new UnprocessableError('The body must be a JSON object.', 'NOT_AN_OBJECT');
      }
      const record = connection.inbound.recordPath ? getPath(body, connection.inbound.recordPath) : body;
      if (record === null || typeof record !== 'object' || Array.isArray(record)) {
        throw new UnprocessableError(`No record object at "${connection.inbound.recordPath}" in the body.`, 'RECORD_MISSING');
      }
      const observed = observeRecord({
        connectionId: connection.id,
        object,
        definition,
        raw: record,
        source: 'hook',
        observedAt,
        deliverUnchanged: connection.deliverUnchanged,
      });
      // The CRM's deleted event: the record it carries is the last version, and goes with the
      // delete (for the ledger), but the change is the delete (DESIGN: deletes reach a hook or the sweep).
      // Its updated_at goes too: a poll page read before the delete, showing that version (its own
      // hook dropped), must not bring the record back.
      const deleteWhen = connection.inbound.deleteWhen;
      const deleted = deleteWhen !== undefined && deleteWhen.equals.includes(String(getPath(body, deleteWhen.path)));
      const change = observed && deleted ? deleteChange({ connectionId: connection.id, object }, observed.crmId, 'hook', observedAt, record, observed.rank ?? null) : observed;
      if (change === undefined) {
        throw new UnprocessableError(`The record has no usable id at "${definition.idPath}" (a non-empty string or a number).`, 'RECORD_ID_MISSING');
      }

      const { crmId } = change;
      // Mapped fields only, sensitive ones redacted: the raw body never reaches a log line.
      if (logsDebug(request.log)) {
        request.log.debug({ connection: connection.id, object, crmId, version: change.version, fields: redactFields(change.fields, definition) }, 'hook record');
      }
      const outcome =
        connection.inbound.payload === 'notification' && !deleted
          ? await app.changeWriter.submitNotification({ connectionId: connection.id, object, crmId, observedAt, raw: body })
          : await app.changeWriter.submit(change);
      // Set once the hook was taken, never for a refused one (a 422 body the configuration cannot
      // read): /health's lastReceivedAt must not say the automation works while nothing is recorded.
      // Kept in memory as well as read from the ledger because a duplicate writes no ledger row.
      app.hookActivity.set(connection.id, observedAt);

      if (outcome.disposition === 'notified') app.poller.notified(connection.id, object);
      request.log.info({ connection: connection.id, object, crmId, eventId: outcome.eventId, disposition: outcome.disposition }, `${HOOK_STORY[outcome.disposition]}: ${connection.id} ${object} ${crmId}`);
      app.metrics.changes.inc({ connection: connection.id, object, source: 'hook', disposition: outcome.disposition });
      if (outcome.disposition === 'accepted' || outcome.disposition === 'notified') {
        return reply.code(202).send({ status: 'accepted', eventId: outcome.eventId });
      }
      return reply.code(200).send({ status: outcome.disposition, eventId: outcome.eventId });
    },
  );
}

/** What the log says about each hook, in the words an operator would use. */
const HOOK_STORY: Record<GateDisposition, string> = {
  accepted: 'hook accepted',
  notified: 'hook accepted: notification stored, the record will be fetched',
  duplicate: 'duplicate hook ignored',
  stale: 'stale hook recorded, not delivered: a newer version was already seen',
  unchanged: 'hook recorded, not delivered: nothing that is mapped changed',
  echo: "echo suppressed: the hook carried the bridge's own write",
};

function hookAnswerSchema(description: string) {
  return {
    description,
    type: 'object',
    properties: { status: { type: 'string', enum: ['accepted', 'duplicate', 'stale', 'unchanged', 'echo'] }, eventId: { type: 'string' } },
    required: ['status', 'eventId'],
  } as const;
}

function firstValue(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value;
}
