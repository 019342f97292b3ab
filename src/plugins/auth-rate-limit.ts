import rateLimit from '@fastify/rate-limit';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import { AppError, problem } from '../errors.js';

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * For routes that check their credential before the limit (hooks): throws the 429 when the
     * caller's address is over the limit. Call it only once the credential has failed.
     */
    refuseRepeatedFailures(request: FastifyRequest, reply: FastifyReply): Promise<void>;
  }
  interface FastifyContextConfig {
    /** The route lets a valid credential through whatever its address did, and calls refuseRepeatedFailures itself. */
    credentialBeforeLimit?: boolean;
  }
}

/**
 * Repeated authentication failures from one address get 429 (issue 9). Only failures are
 * counted: a 401 anywhere (hooks, the admin and outbound APIs, the status page, a protected
 * /metrics) and a refused OAuth callback (bad state or cookie). Operator routes check the count
 * before the credential, so a guesser is stopped. Hooks check their secret first: a valid secret
 * is always served, because a CRM's automation shares its egress address with everything else
 * the CRM sends (a rule still firing with a retired secret, other tenants), and refusing its good
 * hooks would leave their changes to the next poll. A hook secret is at least 16 characters, far
 * beyond guessing at any rate; a wrong one gets 429 like anywhere else once over the limit.
 *
 * The counts live in this process (@fastify/rate-limit's LRU store): each replica limits on its
 * own. Behind a load balancer set TRUST_PROXY, or every caller shares the balancer's address.
 * AUTH_FAILURE_LIMIT=N answers N failures from one address in the window, then refuses its next
 * request with 429, and of failures sent all at once answers N and refuses the rest;
 * AUTH_FAILURE_LIMIT=0 turns the limit off.
 */
export default fp(
  async (app: FastifyInstance) => {
    const { AUTH_FAILURE_LIMIT: max, AUTH_FAILURE_WINDOW: timeWindow } = app.config.env;
    if (max === 0) {
      app.decorate('refuseRepeatedFailures', async () => {});
      return;
    }
    await app.register(rateLimit, { global: false, max, timeWindow });
    const failures = app.createRateLimit({ max, timeWindow });

    const refusal = 'Too many failed authentications from this address; try again later.';
    const refuseRepeatedFailures = async (request: FastifyRequest, reply: FastifyReply) => {
      // Read, not counted: only the answer says whether this request fails. The library's
      // `isExceeded` (count > max) is for a count that includes the request being made; this
      // count is of failures already made, so `max` of them are the whole allowance.
      const state = await failures(request, { increment: false });
      if (state.isAllowed || state.remaining > 0) return;
      reply.header('retry-after', String(state.ttlInSeconds));
      request.log.warn({ remoteAddress: request.ip }, 'request refused: too many failed authentications from this address');
      throw new AppError(429, RATE_LIMITED, refusal);
    };
    app.decorate('refuseRepeatedFailures', refuseRepeatedFailures);

    app.addHook('onRequest', async (request, reply) => {
      // Load balancers and ops must always reach the probes; they never authenticate.
      if (isProbe(request) || request.routeOptions.config.credentialBeforeLimit) return;
      await refuseRepeatedFailures(request, reply);
    });

    // A failure is counted as its answer is made, and the count decides that answer: a burst
    // sent at once passes the check above together, and of its failures the first `max` are
    // answered as failures and the rest 429. Counted once the answer went out instead, the whole
    // burst would be answered 401.
    // One count at a time: the store hands every caller its one live entry, so a count read after
    // other failures were counted would be theirs too.
    let counted: Promise<unknown> = Promise.resolve();
    app.addHook('onSend', async (request, reply, payload) => {
      if (!isAuthFailure(request, reply.statusCode)) return payload;
      const counting = counted.then(() => failures(request));
      counted = counting.catch(() => {});
      const state = await counting;
      if (state.isAllowed || !state.isExceeded) return payload;
      request.log.warn({ remoteAddress: request.ip }, 'request refused: too many failed authentications from this address');
      reply.removeHeader('www-authenticate');
      reply.code(429).header('retry-after', String(state.ttlInSeconds)).type('application/problem+json');
      return JSON.stringify(problem(429, RATE_LIMITED, refusal));
    });
  },
  { name: 'auth-rate-limit', dependencies: ['config'] },
);

const RATE_LIMITED = 'RATE_LIMITED';

function isProbe(request: FastifyRequest): boolean {
  const path = request.url.split('?')[0];
  return path === '/health' || path === '/health/live';
}

function isAuthFailure(request: FastifyRequest, status: number): boolean {
  if (status === 401) return true;
  // The OAuth callback answers a forged or stale state with 400: that is its failed authentication.
  return status === 400 && request.routeOptions.url === '/oauth/:connection/callback';
}
