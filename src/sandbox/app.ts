// Builds the sandbox's Fastify app and never listens: index.ts does that, so tests, the CLI and
// the benchmark all go through this one factory.
import formbody from '@fastify/formbody';
import Fastify from 'fastify';
import type { FastifyInstance } from 'fastify';
import { clioApiRoutes } from './clio-routes.js';
import { controlRoutes } from './control-routes.js';
import { hubspotRoutes } from './hubspot-routes.js';
import { oauthRoutes } from './oauth-routes.js';
import { logRequest, requestMeta } from './request-meta.js';
import type { SandboxState } from './state.js';

export interface SandboxAppOptions {
  control: boolean;
  logger: boolean;
}

/** What a wrong host typically serves: a web server's HTML page where JSON was promised. */
const DOCUMENTED_HOST_PAGE = `<!DOCTYPE html>
<html><head><title>The page you were looking for doesn't exist (404)</title></head>
<body><div class="dialog"><h1>The page you were looking for doesn't exist.</h1>
<p>You may have mistyped the address or the page may have moved.</p></div></body></html>`;

export async function buildSandboxApp(state: SandboxState, opts: SandboxAppOptions): Promise<FastifyInstance> {
  const app = Fastify({ logger: opts.logger, bodyLimit: 10 * 1024 * 1024, forceCloseConnections: true });
  await app.register(formbody);

  app.addHook('onResponse', async (req, reply) => {
    logRequest(state, req, reply.statusCode);
  });
  // A server whose clock is off sends its Date from that clock: the one a client can measure the
  // skew by (X-RateLimit-Reset is on the same clock).
  app.addHook('onSend', async (_req, reply, payload) => {
    reply.header('date', new Date(state.clock.now()).toUTCString());
    return payload;
  });

  // The real API and its "documented" twin: the same routes under /documented, which the
  // documentedHostBroken switch turns into an HTML error page.
  for (const prefix of ['', '/documented']) {
    await app.register(
      async (scope) => {
        if (prefix) {
          scope.addHook('onRequest', async (req, reply) => {
            if (!state.switches.documentedHostBroken) return undefined;
            requestMeta(req).fault = 'documented_host';
            return reply.code(404).type('text/html; charset=utf-8').send(DOCUMENTED_HOST_PAGE);
          });
        }
        await scope.register(oauthRoutes, { state, autoApprove: () => state.switches.autoApprove, mountedAt: prefix });
        await scope.register(clioApiRoutes, { state });
      },
      { prefix },
    );
  }

  // The HubSpot dialect shares the records and the OAuth grants; it has no documented twin.
  await app.register(hubspotRoutes, { state });

  if (opts.control) await app.register(controlRoutes, { state, prefix: '/_sandbox' });
  return app;
}
