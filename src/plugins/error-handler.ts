import type { FastifyError, FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { AppError, problem } from '../errors.js';

/**
 * The one place errors become responses: typed errors and Fastify's own 4xx (bad JSON, body too
 * large, wrong content type, prototype poisoning, schema validation) keep their status and a
 * clear detail; anything else is a generic 500 whose detail goes to the log only.
 */
export default fp(
  async (app: FastifyInstance) => {
    app.setErrorHandler((error: FastifyError | AppError | Error, request, reply) => {
      const status = statusOf(error);
      if (status >= 500) {
        request.log.error({ err: error }, 'request failed');
        return reply
          .code(status)
          .type('application/problem+json')
          .send(problem(status, 'INTERNAL', 'The request could not be completed; the error has been logged.'));
      }
      const code = error instanceof AppError ? error.code : codeOf(error as FastifyError, status);
      return reply.code(status).type('application/problem+json').send(problem(status, code, detailOf(error as FastifyError, status)));
    });

    app.setNotFoundHandler((request, reply) =>
      reply
        .code(404)
        .type('application/problem+json')
        .send(problem(404, 'NOT_FOUND', `No route for ${request.method} ${request.url.split('?')[0]}.`)),
    );
  },
  { name: 'error-handler' },
);

function statusOf(error: Error): number {
  const status = (error as FastifyError).statusCode;
  return typeof status === 'number' && status >= 400 && status < 600 ? status : 500;
}

function codeOf(error: FastifyError, status: number): string {
  if (error.code === 'FST_ERR_CTP_BODY_TOO_LARGE' || status === 413) return 'BODY_TOO_LARGE';
  if (error.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' || status === 415) return 'UNSUPPORTED_MEDIA_TYPE';
  if (error.validation) return 'VALIDATION_FAILED';
  return status === 429 ? 'RATE_LIMITED' : 'BAD_REQUEST';
}

function detailOf(error: FastifyError, status: number): string {
  if (status === 413 && !(error instanceof AppError)) return 'The request body is larger than this endpoint accepts.';
  if (status === 415 && !(error instanceof AppError)) return 'Send the body as JSON with Content-Type: application/json.';
  return error.message;
}
