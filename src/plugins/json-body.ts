import { isUtf8 } from 'node:buffer';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import sjson from 'secure-json-parse';
import { AppError, BadRequestError } from '../errors.js';
import { MAX_JSON_DEPTH, mendStrings, needsMending, nestsDeeperThan } from '../json-text.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** A tighter body limit than the route's, set by a route's onRequest hook (per connection). */
    bodyLimitOverride?: number;
  }
  interface FastifyContextConfig {
    /**
     * The route takes no body or an optional one: an empty body is no body, whatever type it
     * declares (`curl -X POST -H 'Content-Type: application/json'` without `-d` sends one, and
     * `curl -X POST -d ''` an empty form). Elsewhere an empty body is refused (400 as JSON, 415
     * as anything else).
     */
    bodyOptional?: boolean;
  }
}

/**
 * Bodies are JSON or nothing: text/plain and forms get 415 instead of being taken as strings.
 * Parsing refuses `__proto__` and `constructor.prototype` keys and says so, rather than the
 * generic "not valid JSON" message, reads a NUL or a lone surrogate as U+FFFD, and refuses
 * nesting deeper than MAX_JSON_DEPTH (see json-text.ts). An empty body is refused, except on a
 * route whose config says `bodyOptional`, where it is no body (`request.body` undefined).
 */
export default fp(
  async (app: FastifyInstance) => {
    app.removeAllContentTypeParsers();
    const parseJson = (request: FastifyRequest, body: Buffer, done: (err: Error | null, body?: unknown) => void) => {
      if (body.length === 0 && request.routeOptions.config.bodyOptional === true) {
        done(null, undefined);
        return;
      }
      // Fastify neither decompresses nor transcodes: a compressed or non-UTF-8 body would be read
      // as garbage (or, worse, as replacement characters in a record that then gets stored).
      const encoding = request.headers['content-encoding'];
      if (encoding !== undefined && encoding.trim().toLowerCase() !== 'identity') {
        done(new AppError(415, 'UNSUPPORTED_CONTENT_ENCODING', `Content-Encoding ${encoding.slice(0, 32)} is not accepted; send the JSON body uncompressed.`));
        return;
      }
      const charset = /;\s*charset\s*=\s*"?([^";\s]+)/i.exec(request.headers['content-type'] ?? '')?.[1]?.toLowerCase();
      if (charset !== undefined && charset !== 'utf-8' && charset !== 'utf8') {
        done(new AppError(415, 'UNSUPPORTED_CHARSET', `Send JSON as UTF-8 (charset ${charset.slice(0, 32)} is not accepted).`));
        return;
      }
      if (!isUtf8(body)) {
        done(new BadRequestError('The body is not valid UTF-8; send JSON encoded as UTF-8.', 'INVALID_ENCODING'));
        return;
      }
      const limit = request.bodyLimitOverride;
      if (limit !== undefined && body.length > limit) {
        done(new AppError(413, 'BODY_TOO_LARGE', `The body is larger than this endpoint's limit of ${limit} bytes.`));
        return;
      }
      if (body.length === 0) {
        done(new BadRequestError('The body is empty; send a JSON object.', 'INVALID_JSON'));
        return;
      }
      if (nestsDeeperThan(body, MAX_JSON_DEPTH)) {
        done(new BadRequestError(`The JSON body nests arrays and objects more than ${MAX_JSON_DEPTH} levels deep.`, 'JSON_TOO_DEEP'));
        return;
      }
      try {
        done(null, sjson.parse(body, needsMending(body) ? mendStrings : undefined, { protoAction: 'error', constructorAction: 'error' }));
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
    // Any other type, or none, is refused with 415, unread; only a declared empty body is no body
    // where the route takes none (`curl -X POST -d ''` sends an empty form).
    app.addContentTypeParser('*', (request, _payload, done) => {
      if (request.headers['content-length'] === '0' && request.routeOptions.config.bodyOptional === true) done(null, undefined);
      else done(new AppError(415, 'UNSUPPORTED_MEDIA_TYPE', 'Send the body as JSON with Content-Type: application/json.'));
    });
  },
  { name: 'json-body' },
);
