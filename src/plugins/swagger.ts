import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';

/**
 * OpenAPI built from the routes' own `schema` (the ones Fastify validates and serializes with),
 * so the document cannot drift from the behaviour. Registered before the routes: it collects
 * them as they are added. `/docs` (UI and `/docs/json`) needs the admin credential, as every
 * operator surface does.
 */
export default fp(
  async (app: FastifyInstance) => {
    await app.register(swagger, {
      openapi: {
        openapi: '3.1.0',
        info: {
          title: 'crm-bridge',
          version: '0.1.0',
          description: 'Keeps an intake pipeline in reliable two-way sync with a legacy CRM: hooks, a reconciling poller, one idempotent ledger, delivery and a loop guard.',
        },
        components: {
          securitySchemes: {
            admin: { type: 'http', scheme: 'bearer', description: 'ADMIN_TOKEN' },
            adminBasic: { type: 'http', scheme: 'basic', description: 'any user name, ADMIN_TOKEN as the password (browsers)' },
            hookSecret: { type: 'http', scheme: 'bearer', description: "one of the connection's inbound.secrets (or in the header the connection names)" },
            pipelineKey: { type: 'http', scheme: 'bearer', description: "one of the connection's outbound.apiKeys (the intake pipeline's writes)" },
            metrics: { type: 'http', scheme: 'bearer', description: 'METRICS_TOKEN, only when it is set' },
          },
        },
      },
    });
    await app.register(swaggerUi, {
      routePrefix: '/docs',
      uiConfig: { docExpansion: 'list', deepLinking: false },
      uiHooks: { onRequest: app.requireAdmin },
      staticCSP: true,
    });
  },
  { name: 'swagger', dependencies: ['admin-auth'] },
);
