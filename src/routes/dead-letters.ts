import type { FastifyInstance } from 'fastify';
import { listDeadLetters, replayDeadLetter } from '../db/queries/outbox.js';
import { ConflictError, NotFoundError, UnauthorizedError } from '../errors.js';
import { UUID_PATTERN } from '../ids.js';
import { bearerToken, matchesAnySecret, sha256 } from '../security.js';
import { describeLater } from '../sync/dead-letters.js';

const deadLetterSchema = {
  type: 'object',
  properties: {
    eventId: { type: 'string' },
    connection: { type: 'string' },
    object: { type: 'string' },
    crmId: { type: 'string' },
    change: { type: 'string' },
    version: { type: ['string', 'null'] },
    attempts: { type: 'integer' },
    lastStatus: { type: ['integer', 'null'] },
    lastError: { type: ['string', 'null'] },
    queuedAt: { type: 'string' },
  },
  required: ['eventId', 'connection', 'object', 'crmId', 'change', 'version', 'attempts', 'lastStatus', 'lastError', 'queuedAt'],
} as const;

/**
 * Admin API for changes the pipeline refused or that ran out of retries. `Authorization: Bearer
 * $ADMIN_TOKEN`, compared in constant time. With ADMIN_TOKEN unset every request gets the same
 * 401 as a wrong token, rather than a 404: the routes stay discoverable in the docs and an
 * operator who forgot the token is told about credentials, while nothing is open by default.
 */
export default async function deadLetterRoutes(app: FastifyInstance) {
  const token = app.config.env.ADMIN_TOKEN;
  const adminHashes = token === undefined ? undefined : [sha256(token)];
  if (adminHashes === undefined) app.log.info('ADMIN_TOKEN is not set: the status page, /docs and the dead-letter API refuse every request');

  app.addHook('onRequest', async (request) => {
    if (!matchesAnySecret(bearerToken(request.headers.authorization), adminHashes)) {
      request.log.warn('admin request rejected: missing or invalid token');
      throw new UnauthorizedError();
    }
  });

  app.get<{ Querystring: { connection?: string; limit: number; before?: number } }>(
    '/v1/dead-letters',
    {
      schema: {
        querystring: {
          type: 'object',
          properties: {
            connection: { type: 'string', maxLength: 63 },
            limit: { type: 'integer', minimum: 1, maximum: 500, default: 50 },
            /** `nextBefore` from the previous page. Bounded: a larger number would be past the outbox's bigint id (a database error, not a 400). */
            before: { type: 'integer', minimum: 1, maximum: Number.MAX_SAFE_INTEGER },
          },
          additionalProperties: false,
        },
        response: {
          200: {
            type: 'object',
            properties: { items: { type: 'array', items: deadLetterSchema }, nextBefore: { type: ['integer', 'null'] } },
            required: ['items', 'nextBefore'],
          },
        },
      },
    },
    async (request) => {
      const { items, nextBefore } = await listDeadLetters(app.db, {
        connectionId: request.query.connection,
        limit: request.query.limit,
        before: request.query.before,
      });
      return {
        items: items.map(({ id: _id, connectionId, queuedAt, ...rest }) => ({ ...rest, connection: connectionId, queuedAt: queuedAt.toISOString() })),
        nextBefore,
      };
    },
  );

  app.post<{ Params: { eventId: string }; Querystring: { force: boolean } }>(
    '/v1/dead-letters/:eventId/replay',
    {
      // It reads no body; operators' curl often sends an empty one declared as JSON.
      config: { bodyOptional: true },
      schema: {
        params: { type: 'object', properties: { eventId: { type: 'string', pattern: UUID_PATTERN } }, required: ['eventId'] },
        querystring: {
          type: 'object',
          properties: {
            /** Replay even though a later change of the record was delivered (or is being delivered): the pipeline gets the older version after it. */
            force: { type: 'boolean', default: false },
          },
          additionalProperties: false,
        },
        response: {
          202: {
            type: 'object',
            properties: { status: { type: 'string', const: 'queued' }, eventId: { type: 'string' } },
            required: ['status', 'eventId'],
          },
        },
      },
    },
    async (request, reply) => {
      const { eventId } = request.params;
      const outcome = await replayDeadLetter(app.db, eventId.toLowerCase(), { force: request.query.force });
      if (outcome.status === 'not_found') throw new NotFoundError(`No change with event id ${eventId} is in the outbox.`);
      if (outcome.status === 'not_dead') throw new ConflictError(`Change ${eventId} is ${outcome.state}, not a dead letter.`, 'NOT_A_DEAD_LETTER');
      if (outcome.status === 'newer_change') {
        throw new ConflictError(
          `Change ${eventId} of ${outcome.object}/${outcome.crmId} was not replayed: ${describeLater(outcome.newer)}, and replaying the older change would move the record back in time downstream. Add ?force=true to replay it anyway.`,
          'NEWER_CHANGE_DELIVERED',
        );
      }
      const context = { eventId, connection: outcome.connectionId, object: outcome.object, crmId: outcome.crmId };
      if (outcome.overtook) request.log.warn({ ...context, newerEventId: outcome.overtook.eventId }, `dead letter forced into replay after a later change: ${describeLater(outcome.overtook)}`);
      request.log.info(context, 'dead letter queued for replay');
      return reply.code(202).send({ status: 'queued', eventId });
    },
  );
}
