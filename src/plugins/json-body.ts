import type { FastifyInstance, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import sjson from 'secure-json-parse';
import { AppError, BadRequestError } from '../errors.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** A tighter body limit than the route's, set by a route's onRequest hook (per connection). */
    bodyLimitOverride?: number;
  }
}

/**
 * Bodies are JSON or nothing: text/plain and forms get 415 instead of being taken as strings.
 * Parsing refuses `__proto__` and `constructor.prototype` keys and says so, rather than the
 * generic "not valid JSON" message.
 */
export default fp(
  async (app: FastifyInstance) => {
    app.removeAllContentTypeParsers();
    const parseJson = (request: FastifyRequest, body: Buffer, done: (err: Error | null, body?: unknown) => void) => {
      const limit = request.bodyLimitOverride;
      if (limit !== undefined && body.length > limit) {
        done(new AppError(413, 'BODY_TOO_LARGE', `The body is larger than this endpoint's limit of ${limit} bytes.`));
        return;
      }
      if (body.length === 0) {
        done(new BadRequestError('The body is empty; send a JSON object.', 'INVALID_JSON'));
        return;
      }
      try {
        done(null, sjson.parse(body, undefined, { protoAction: 'error', constructorAction: 'error' }));
      } catch (err) {
        const message = (err as Error).message;
        done(
          /prototype/i.test(message)
            ? new BadRequestError('The JSON body contains a forbidden __proto__ or constructor.prototype key.', 'FORBIDDEN_KEY')
            : new BadRequestError(`The body is not valid JSON: ${message}.`, 'INVALID_JSON'),
        );
      }
    };
    app.addContentTypeParser('application/json', { parseAs: 'buffer' }, parseJson);
    app.addContentTypeParser(/^application\/[\w.+-]+\+json$/, { parseAs: 'buffer' }, parseJson);
  },
  { name: 'json-body' },
);
