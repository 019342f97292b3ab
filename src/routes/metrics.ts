import type { FastifyInstance } from 'fastify';
import { UnauthorizedError } from '../errors.js';
import { bearerToken, matchesAnySecret, sha256 } from '../security.js';

/**
 * `GET /metrics` in the Prometheus text format. Open by default (scraped on an internal
 * network, and it carries no client data); with METRICS_TOKEN set it needs that bearer.
 */
export default async function metricsRoutes(app: FastifyInstance) {
  const token = app.config.env.METRICS_TOKEN;
  const hashes = token === undefined ? undefined : [sha256(token)];

  app.get(
    '/metrics',
    {
      schema: {
        summary: 'Prometheus metrics (bearer METRICS_TOKEN when configured)',
        tags: ['operations'],
        response: { 200: { description: 'Prometheus text exposition format', type: 'string' } },
      },
      onRequest: async (request) => {
        if (hashes !== undefined && !matchesAnySecret(bearerToken(request.headers.authorization), hashes)) {
          request.log.warn('metrics request rejected: missing or invalid token');
          throw new UnauthorizedError();
        }
      },
    },
    async (_request, reply) => {
      const body = await app.metrics.registry.metrics();
      return reply.type(app.metrics.registry.contentType).header('cache-control', 'no-store').send(body);
    },
  );
}
