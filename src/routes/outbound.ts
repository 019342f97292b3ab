import type { FastifyInstance, FastifyRequest } from 'fastify';
import { findOutboundWriteByKey, getDeliveredState, getOutboundWrite, insertOutboundWrite, type OutboundWrite } from '../db/queries/outbound.js';
import { BadRequestError, ConflictError, NotFoundError, UnauthorizedError, UnprocessableError } from '../errors.js';
import { timeOrderedId, UUID_PATTERN } from '../ids.js';
import type { Connection } from '../plugins/config.js';
import { bearerToken, matchesAnySecret, sha256 } from '../security.js';
import { asTheCrmKeepsThem, expectedEcho, fieldsToWrite } from '../sync/outbound-writer.js';
import { canonicalJson, contentHash } from '../sync/record.js';

declare module 'fastify' {
  interface FastifyRequest {
    outboundConnection?: Connection;
  }
}

const IDEMPOTENCY_KEY = /^[\x21-\x7e]{1,255}$/;

/**
 * Every write needs its Idempotency-Key. Checked before the schema's validation, so a missing or
 * malformed key is answered with its own code (IDEMPOTENCY_KEY_REQUIRED), not as a failed
 * validation of the headers; the headers schema below says the same for /docs (OpenAPI), where
 * a pipeline generating its client learns it must send one.
 */
async function requireIdempotencyKey(request: FastifyRequest) {
  const key = request.headers['idempotency-key'];
  if (typeof key !== 'string' || !IDEMPOTENCY_KEY.test(key)) {
    throw new BadRequestError('Send an Idempotency-Key header (1 to 255 visible ASCII characters) with every write.', 'IDEMPOTENCY_KEY_REQUIRED');
  }
}

const writeHeadersSchema = {
  type: 'object',
  properties: {
    'idempotency-key': {
      type: 'string',
      pattern: IDEMPOTENCY_KEY.source,
      description: 'One per write. The same key with the same body gets the same write (409 while it is still pending); with another body, 422.',
    },
  },
  required: ['idempotency-key'],
} as const;

interface WriteBody {
  object: string;
  externalId: string;
  crmId?: string;
  fields: Record<string, unknown>;
}

const writeBodySchema = {
  type: 'object',
  properties: {
    object: { type: 'string', minLength: 1, maxLength: 64 },
    /** The pipeline's own id for the record. */
    externalId: { type: 'string', minLength: 1, maxLength: 256 },
    /** Present: update this CRM record. Absent: create one. */
    crmId: { type: 'string', minLength: 1, maxLength: 256 },
    /** Canonical fields (the names the bridge delivers), mapped into the CRM's shape by the connector. */
    fields: { type: 'object' },
  },
  required: ['object', 'externalId', 'fields'],
  additionalProperties: false,
} as const;

const WRITE_KEYS: readonly string[] = Object.keys(writeBodySchema.properties);

/**
 * Fastify's Ajv strips keys the schema does not name (`removeAdditional`) instead of refusing
 * them, and a write without `crmId` is a create: `crm_id` or `crmID` for `crmId` would make a
 * second record in the CRM instead of updating the first. So unknown keys are refused, before
 * validation strips them.
 */
async function refuseUnknownKeys(request: FastifyRequest) {
  const body = request.body;
  if (body === null || typeof body !== 'object' || Array.isArray(body)) return;
  const unknown = Object.keys(body).filter((k) => !WRITE_KEYS.includes(k));
  if (unknown.length === 0) return;
  throw new BadRequestError(`The body has unknown key(s) ${quoted(unknown)}: a write takes ${WRITE_KEYS.join(', ')}.`, 'VALIDATION_FAILED');
}

/** Names a caller sent, for an error: the first five, quoted and cut to 64 characters. */
function quoted(names: readonly string[]): string {
  return names
    .slice(0, 5)
    .map((k) => JSON.stringify(k.slice(0, 64)))
    .join(', ');
}

const acceptedSchema = {
  description: 'queued (or, for a key used before, the write it made and its state now)',
  type: 'object',
  properties: { outboundId: { type: 'string' }, status: { type: 'string', enum: ['pending', 'sent', 'failed'] } },
  required: ['outboundId', 'status'],
} as const;

const skippedSchema = {
  description: 'skipped: the update only hands back what the bridge delivered for the record, or leaves nothing to send; nothing is sent to the CRM',
  type: 'object',
  properties: { status: { type: 'string', const: 'skipped' }, reason: { type: 'string', const: 'echo' }, outboundId: { type: 'string' } },
  required: ['status', 'reason', 'outboundId'],
} as const;

const outboundRecordSchema = {
  description: "the write's state",
  type: 'object',
  properties: {
    outboundId: { type: 'string' },
    connection: { type: 'string' },
    object: { type: 'string' },
    operation: { type: 'string' },
    externalId: { type: ['string', 'null'] },
    state: { type: 'string', enum: ['pending', 'sent', 'failed', 'skipped'] },
    attempts: { type: 'integer' },
    lastStatus: { type: ['integer', 'null'] },
    lastError: { type: ['string', 'null'] },
    crmId: { type: ['string', 'null'] },
    crmVersion: { type: ['string', 'null'] },
    createdAt: { type: 'string' },
    updatedAt: { type: 'string' },
  },
  required: ['outboundId', 'connection', 'object', 'operation', 'externalId', 'state', 'attempts', 'lastStatus', 'lastError', 'crmId', 'crmVersion', 'createdAt', 'updatedAt'],
} as const;

/**
 * The intake pipeline's writes into the CRM (DESIGN "Outbound and the loop guard"). Authenticated
 * by the connection's pipeline API key (any of `outbound.apiKeys`, constant time); missing key,
 * wrong key, unknown connection and a connection that takes no writes all get the same 401.
 *
 * `POST /v1/connections/:connection/records` stamps the write and queues it in one transaction
 * and answers 202; the outbound writer makes the CRM call. `Idempotency-Key` is required: the
 * same key with the same body gets the same answer (409 while that write is still in flight),
 * with another body a 422.
 */
export default async function outboundRoutes(app: FastifyInstance) {
  const keyHashes = new Map<string, Buffer[]>();
  for (const c of app.connections.values()) if (c.outbound) keyHashes.set(c.id, c.outbound.apiKeys.map(sha256));

  const authenticate = async (request: FastifyRequest<{ Params: { connection: string } }>) => {
    const connection = app.connections.get(request.params.connection);
    if (!matchesAnySecret(bearerToken(request.headers.authorization), keyHashes.get(request.params.connection)) || connection === undefined) {
      request.log.warn({ connection: request.params.connection }, 'outbound request rejected: missing or invalid API key');
      throw new UnauthorizedError();
    }
    request.outboundConnection = connection;
  };

  // A write's state is the pipeline's to read, and the operator's (issue 9: record lookups need
  // a credential; the admin token is the operator's). The same 401 otherwise.
  const adminToken = app.config.env.ADMIN_TOKEN;
  const authenticateLookup = async (request: FastifyRequest<{ Params: { connection: string } }>) => {
    const connection = app.connections.get(request.params.connection);
    const accepted = [...(keyHashes.get(request.params.connection) ?? []), ...(adminToken === undefined ? [] : [sha256(adminToken)])];
    if (!matchesAnySecret(bearerToken(request.headers.authorization), connection && accepted.length > 0 ? accepted : undefined) || connection === undefined) {
      request.log.warn({ connection: request.params.connection }, 'outbound lookup rejected: missing or invalid credential');
      throw new UnauthorizedError();
    }
    request.outboundConnection = connection;
  };

  app.post<{ Params: { connection: string }; Body: WriteBody }>(
    '/v1/connections/:connection/records',
    {
      onRequest: authenticate,
      preValidation: [requireIdempotencyKey, refuseUnknownKeys],
      schema: {
        summary: "The pipeline's write of a record into the CRM: a create, or an update of `crmId`",
        description:
          'Answers 400 without an Idempotency-Key or for a body key a write does not take (a misspelt crmId), 401 for a missing or wrong API key, 409 while the write under this key is still pending, 422 for this key with another body, an object or field the connector cannot write, or a null for a field that cannot be cleared (problem+json, with a `code`).',
        tags: ['outbound'],
        security: [{ pipelineKey: [] }],
        headers: writeHeadersSchema,
        params: { type: 'object', properties: { connection: { type: 'string', maxLength: 63 } }, required: ['connection'] },
        body: writeBodySchema,
        response: { 200: skippedSchema, 202: acceptedSchema },
      },
    },
    async (request, reply) => {
      const connection = request.outboundConnection!;
      // Checked by requireIdempotencyKey.
      const key = request.headers['idempotency-key'] as string;
      const { object, externalId, crmId, fields } = request.body;
      // Own keys only: an object named `constructor` must not find Object's members (Object.create).
      const definition = Object.hasOwn(connection.connector.objects, object) ? connection.connector.objects[object] : undefined;
      const operation = crmId === undefined ? 'create' : 'update';
      if (definition === undefined || definition[operation] === undefined) {
        const writable = Object.entries(connection.connector.objects).filter(([, d]) => d[operation] !== undefined).map(([name]) => name);
        throw new UnprocessableError(`Connection ${connection.id} cannot ${operation} "${object}" (it can ${operation}: ${writable.join(', ') || 'nothing'}).`, 'UNKNOWN_OBJECT');
      }
      // A name the field map does not have would be dropped by toRecord and the write shown
      // `sent` without it (a misspelt `locaton`). Read-only names are mapped and stay allowed:
      // a pipeline may hand back the fields it was delivered.
      const mapped = definition.fields;
      const unmapped = mapped === undefined ? [] : Object.keys(fields).filter((name) => !Object.hasOwn(mapped, name));
      if (mapped !== undefined && unmapped.length > 0) {
        throw new UnprocessableError(`"${object}" has no field(s) ${quoted(unmapped)} (its fields: ${Object.keys(mapped).join(', ')}).`, 'UNKNOWN_FIELD');
      }
      // Over what the pipeline sent, not what is sent on: the same request is the same request
      // whatever the bridge has learnt of the record since.
      const requestHash = contentHash({ object, externalId, crmId: crmId ?? null, fields });
      // The writes' primary key, time-ordered as the ledger's event ids are (see timeOrderedId).
      const id = timeOrderedId();
      const known = crmId === undefined ? undefined : await getDeliveredState(app.db, { connectionId: connection.id, object, crmId });
      // From here on, as the CRM will keep them (a number as text where it keeps text).
      const kept = asTheCrmKeepsThem(definition, fields);
      // The loop guard's other direction: the pipeline handing back a CRM-born record as the
      // bridge delivered it would only make the CRM write it again and fire the automation.
      const pushedBack = pushesBackUnchanged(known, kept);
      const sent = fieldsToWrite(definition, operation, kept, known?.seen ?? null);
      if (!pushedBack && sent.uncleared.length > 0) {
        // Refused by what the bridge knows now, which a write accepted earlier under this key
        // did not depend on: that request gets its own answer again.
        const earlier = await findOutboundWriteByKey(app.db, connection.id, key);
        if (earlier !== undefined) {
          const { code, body } = replay(earlier, requestHash);
          return reply.code(code).send(body);
        }
        throw new UnprocessableError(
          `"${object}" field(s) ${quoted(sent.uncleared)} cannot be cleared with null: the connector writes them through a template (writeAs) that can add a value but not remove one. Leave them out, or clear them in the CRM.`,
          'FIELD_NOT_CLEARABLE',
        );
      }
      // An update whose every field the record already shows, though not one the loop guard
      // recognises as pushed back: nothing is left to send.
      const skip = pushedBack || (operation === 'update' && Object.keys(fields).length > 0 && Object.keys(sent.fields).length === 0);
      const echo = expectedEcho(definition, operation, sent.fields, id);

      const { created, row } = await insertOutboundWrite(app.db, {
        id,
        connectionId: connection.id,
        object,
        idempotencyKey: key,
        requestHash,
        externalId,
        crmId: crmId ?? null,
        operation,
        fields: sent.fields,
        echoMatch: echo,
        // The best guess before the CRM answers; the writer replaces it with the answer's exact hash.
        contentHash: contentHash(echo.fields),
        state: skip ? 'skipped' : 'pending',
        // A skipped write reached nothing and is never an echo candidate.
        ...(skip ? { settledAt: new Date() } : {}),
      });
      if (created) request.log.info({ connection: connection.id, object, outboundId: id, operation, skipped: skip }, skip ? 'outbound write skipped: echo' : 'outbound write queued');
      const { code, body } = created ? answer(row) : replay(row, requestHash);
      return reply.code(code).send(body);
    },
  );

  app.get<{ Params: { connection: string; outboundId: string } }>(
    '/v1/connections/:connection/records/:outboundId',
    {
      onRequest: authenticateLookup,
      schema: {
        summary: "A pipeline write's state: pending, sent (with the CRM id), failed (with the last error) or skipped",
        tags: ['outbound'],
        security: [{ pipelineKey: [] }, { admin: [] }],
        params: {
          type: 'object',
          properties: { connection: { type: 'string', maxLength: 63 }, outboundId: { type: 'string', pattern: UUID_PATTERN } },
          required: ['connection', 'outboundId'],
        },
        response: { 200: outboundRecordSchema },
      },
    },
    async (request) => {
      const connection = request.outboundConnection!;
      const row = await getOutboundWrite(app.db, connection.id, request.params.outboundId.toLowerCase());
      if (row === undefined) throw new NotFoundError(`No outbound write ${request.params.outboundId} for connection ${connection.id}.`);
      return {
        outboundId: row.id,
        connection: row.connectionId,
        object: row.object,
        operation: row.operation,
        externalId: row.externalId,
        state: row.state,
        attempts: row.attempts,
        lastStatus: row.lastStatus,
        lastError: row.lastError,
        crmId: row.crmId,
        crmVersion: row.crmVersion,
        createdAt: row.createdAt.toISOString(),
        updatedAt: row.updatedAt.toISOString(),
      };
    },
  );
}

function answer(row: OutboundWrite): { code: 200 | 202; body: Record<string, string> } {
  if (row.state === 'skipped') return { code: 200, body: { status: 'skipped', reason: 'echo', outboundId: row.id } };
  return { code: 202, body: { outboundId: row.id, status: row.state } };
}

/** A key used before: the same request gets its answer again, once it is no longer in flight. */
function replay(row: OutboundWrite, requestHash: string) {
  if (row.requestHash !== requestHash) {
    throw new UnprocessableError('This Idempotency-Key was used for a different request; use a new key for a new write.', 'IDEMPOTENCY_KEY_REUSED');
  }
  if (row.state === 'pending') {
    throw new ConflictError(`The write ${row.id} under this Idempotency-Key is still in flight; ask again once its CRM call is done.`, 'IN_FLIGHT');
  }
  return answer(row);
}

/**
 * The record was last changed in the CRM (origin `crm`) and every field the pipeline sends is
 * what the bridge delivered for it: writing it would change nothing but start another round.
 */
function pushesBackUnchanged(state: Awaited<ReturnType<typeof getDeliveredState>>, fields: Record<string, unknown>): boolean {
  if (state === undefined || state.origin !== 'crm' || state.deleted || state.fields === null) return false;
  const delivered = state.fields;
  const names = Object.keys(fields);
  return names.length > 0 && names.every((name) => Object.hasOwn(delivered, name) && canonicalJson(fields[name] ?? null) === canonicalJson(delivered[name] ?? null));
}
