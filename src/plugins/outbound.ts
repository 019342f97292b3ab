import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { OutboundWriter } from '../sync/outbound-writer.js';

declare module 'fastify' {
  interface FastifyInstance {
    /** One outbound writer per connection that has an `outbound` section; tests tick them directly. */
    outboundWriters: Map<string, OutboundWriter>;
  }
}

/**
 * Outbound writers, one per connection that accepts pipeline writes, started and stopped with
 * the other daemons. Every replica runs them: claims with leases share the work.
 */
export default fp(
  async (app: FastifyInstance) => {
    const instance = app.config.env.INSTANCE_ID ?? `${hostname()}:${process.pid}`;
    const writers = new Map<string, OutboundWriter>();
    for (const connection of app.connections.values()) {
      if (connection.outbound === undefined) continue;
      const writer = new OutboundWriter({
        db: app.db,
        connectionId: connection.id,
        outbound: connection.outbound,
        objects: connection.connector.objects,
        connector: () => app.crm.connector(connection.id),
        // The random part keeps two apps in one process (tests, a restart racing its old self) apart.
        owner: `${instance}:${randomUUID().slice(0, 8)}`,
        log: app.log,
      });
      writers.set(connection.id, writer);
      app.daemons.push(writer);
    }
    app.decorate('outboundWriters', writers);
  },
  { name: 'outbound', dependencies: ['config', 'db', 'daemons', 'crm'] },
);
