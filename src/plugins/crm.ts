import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { connectorForConnection, type Connector } from '../crm/connector.js';

declare module 'fastify' {
  interface FastifyInstance {
    crm: {
      /** The connection's connector, authenticated through its token manager; built on first use. */
      connector(connectionId: string): Connector;
    };
  }
}

export default fp(
  async (app: FastifyInstance) => {
    const built = new Map<string, Connector>();
    const log = app.log.child({ component: 'crm' });
    app.decorate('crm', {
      connector(connectionId: string): Connector {
        let connector = built.get(connectionId);
        if (connector === undefined) {
          const connection = app.connections.get(connectionId);
          if (connection === undefined) throw new Error(`unknown connection ${connectionId}`);
          const tokens = app.tokens.get(connectionId);
          connector = connectorForConnection(connection, { log, ...(tokens ? { tokens } : {}) });
          built.set(connectionId, connector);
        }
        return connector;
      },
    });
  },
  { name: 'crm', dependencies: ['config', 'tokens'] },
);
