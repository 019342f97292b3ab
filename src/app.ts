import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyServerOptions } from 'fastify';
import type { Config } from './config/load.js';
import { problem } from './errors.js';
import type { Database } from './db/client.js';
import { loggerOptions } from './logger.js';
import configPlugin from './plugins/config.js';
import crmPlugin from './plugins/crm.js';
import pollerPlugin from './plugins/poller.js';
import daemonsPlugin from './plugins/daemons.js';
import dbPlugin from './plugins/db.js';
import deliveryPlugin from './plugins/delivery.js';
import retentionPlugin from './plugins/retention.js';
import outboundPlugin from './plugins/outbound.js';
import adminAuth from './plugins/admin-auth.js';
import authRateLimit from './plugins/auth-rate-limit.js';
import errorHandler from './plugins/error-handler.js';
import jsonBody from './plugins/json-body.js';
import metricsPlugin from './plugins/metrics.js';
import swaggerPlugin from './plugins/swagger.js';
import tokensPlugin from './plugins/tokens.js';
import deadLetterRoutes from './routes/dead-letters.js';
import healthRoutes from './routes/health.js';
import hookRoutes from './routes/hooks.js';
import outboundRoutes from './routes/outbound.js';
import metricsRoutes from './routes/metrics.js';
import oauthRoutes from './routes/oauth.js';
import statusPageRoutes from './routes/status-page.js';

export interface AppOptions {
  config: Config;
  /** A database owned by the caller; otherwise the app opens one from config and closes it. */
  database?: Database;
  /** A pino logger (tests capture output through its stream); otherwise one from LOG_LEVEL. */
  loggerInstance?: FastifyServerOptions['loggerInstance'];
  /** Start background loops on ready (the server does; tests drive ticks themselves). */
  startDaemons?: boolean;
}

/** Builds crm-bridge: registers everything, migrates the database, never listens. */
export async function buildApp(options: AppOptions): Promise<FastifyInstance> {
  const app = Fastify({
    ...(options.loggerInstance ? { loggerInstance: options.loggerInstance } : { logger: loggerOptions(options.config.env.LOG_LEVEL) }),
    ...(options.config.env.TRUST_PROXY !== undefined ? { trustProxy: options.config.env.TRUST_PROXY } : {}),
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    return503OnClosing: true,
    // Starting may take longer than Fastify's default 10 s: the first start on the embedded
    // database creates it (5-15 s on two busy cores), and a replica's migration on Postgres waits
    // for another replica's.
    pluginTimeout: 120_000,
    // Access lines go out at debug from onResponse below; info is for what happened to changes.
    logController: new LogController({ disableRequestLogging: true }),
    // The router refuses a URL it cannot decode, or an over-long path parameter, before any hook
    // or error handler runs: answer those as problem+json like every other bad request.
    frameworkErrors: (error, _request, routerReply) => {
      const status = typeof error.statusCode === 'number' && error.statusCode >= 400 && error.statusCode < 500 ? error.statusCode : 400;
      void (routerReply as unknown as FastifyReply)
        .code(status)
        .type('application/problem+json')
        .send(problem(status, 'BAD_URL', 'The URL could not be read: it is malformed, or a part of its path is longer than this endpoint accepts.'));
    },
  }) as unknown as FastifyInstance;

  app.addHook('onResponse', async (request, reply) => {
    const level = reply.statusCode >= 500 ? 'warn' : 'debug';
    request.log[level]({ req: request, statusCode: reply.statusCode, ms: Math.round(reply.elapsedTime) }, `${request.method} ${request.routeOptions.url ?? 'unknown route'} ${reply.statusCode}`);
  });
  // Closing waits for every connection to end, and server.close() ends only the idle ones: a
  // request in flight when it began (a hook from a load balancer's kept-alive connection) would
  // leave its connection open after the answer, and the shutdown would wait for the client to
  // drop it, past the grace period (killed, exit 1, the daemons never stopped).
  let closing = false;
  app.addHook('preClose', async () => {
    closing = true;
  });
  app.addHook('onSend', async (_request, reply) => {
    if (closing) reply.header('connection', 'close');
  });
  await app.register(errorHandler);
  await app.register(jsonBody);
  await app.register(configPlugin, { config: options.config });
  // Before every route, so its check runs before any route's own authentication.
  await app.register(authRateLimit);
  await app.register(dbPlugin, { database: options.database });
  await app.register(metricsPlugin);
  await app.register(adminAuth);
  // Before every route: it collects them into the OpenAPI document as they are added.
  await app.register(swaggerPlugin);
  await app.register(daemonsPlugin, { startDaemons: options.startDaemons ?? false });
  await app.register(tokensPlugin);
  await app.register(crmPlugin);
  await app.register(pollerPlugin);
  await app.register(deliveryPlugin);
  await app.register(retentionPlugin);
  await app.register(outboundPlugin);
  await app.register(healthRoutes);
  await app.register(hookRoutes);
  await app.register(outboundRoutes);
  await app.register(oauthRoutes);
  await app.register(deadLetterRoutes);
  await app.register(metricsRoutes);
  await app.register(statusPageRoutes);
  return app;
}
