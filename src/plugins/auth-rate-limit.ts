import rateLimit from '@fastify/rate-limit';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import { AppError } from '../errors.js';

/**
 * Repeated authentication failures from one address get 429 (issue 9). Only failures are
 * counted: a 401 anywhere (hooks, the admin and outbound APIs, the status page, a protected
 * /metrics) and a refused OAuth callback (bad state or cookie). A request is checked against
 * the count before its credentials are, so a guesser is stopped, while an address that only
 * ever authenticates (the CRM's automation sending a burst of hooks) is never slowed.
 *
 * The counts live in this process (@fastify/rate-limit's LRU store): each replica limits on its
 * own. Behind a proxy every caller shares the proxy's address, and a CRM's automation egress is
 * shared by all its tenants, so someone failing from the same address can get the firm's hooks
 * refused for a window; the poller still catches those changes. AUTH_FAILURE_LIMIT=0 turns
 * the limit off.
 */
export default fp(
  async (app: FastifyInstance) => {
    const { AUTH_FAILURE_LIMIT: max, AUTH_FAILURE_WINDOW: timeWindow } = app.config.env;
    if (max === 0) return;
    await app.register(rateLimit, { global: false, max, timeWindow });
    const failures = app.createRateLimit({ max, timeWindow });

    app.addHook('onRequest', async (request, reply) => {
      // Load balancers and ops must always reach the probes; they never authenticate.
      if (isProbe(request)) return;
      const state = await failures(request, { increment: false });
      if (state.isAllowed || !state.isExceeded) return;
      reply.header('retry-after', String(state.ttlInSeconds));
      request.log.warn({ remoteAddress: request.ip }, 'request refused: too many failed authentications from this address');
      throw new AppError(429, 'RATE_LIMITED', 'Too many failed authentications from this address; try again later.');
    });

    app.addHook('onResponse', async (request, reply) => {
      if (isAuthFailure(request, reply.statusCode)) await failures(request);
    });
  },
  { name: 'auth-rate-limit', dependencies: ['config'] },
);

function isProbe(request: FastifyRequest): boolean {
  const path = request.url.split('?')[0];
  return path === '/health' || path === '/health/live';
}

function isAuthFailure(request: FastifyRequest, status: number): boolean {
  if (status === 401) return true;
  // The OAuth callback answers a forged or stale state with 400: that is its failed authentication.
  return status === 400 && request.routeOptions.url === '/oauth/:connection/callback';
}
