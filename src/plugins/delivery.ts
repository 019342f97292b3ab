import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { DeliveryWorker } from '../sync/delivery-worker.js';

declare module 'fastify' {
  interface FastifyInstance {
    /** One delivery worker per connection that has a `downstream`; tests tick them directly. */
    deliveryWorkers: Map<string, DeliveryWorker>;
  }
}

/**
 * Delivery workers, one per connection with a downstream, started and stopped with the other
 * daemons. Every replica runs them: the outbox claims share the work, so there is no leader.
 */
export default fp(
  async (app: FastifyInstance) => {
    const instance = app.config.env.INSTANCE_ID ?? `${hostname()}:${process.pid}`;
    const workers = new Map<string, DeliveryWorker>();
    for (const connection of app.connections.values()) {
      if (connection.downstream === undefined) continue;
      const worker = new DeliveryWorker({
        db: app.db,
        connectionId: connection.id,
        downstream: connection.downstream,
        // The random part keeps two apps in one process (tests, a restart racing its old self) apart.
        owner: `${instance}:${randomUUID().slice(0, 8)}`,
        log: app.log,
        onOutcome: (outcome) => app.metrics.deliveries.inc({ connection: connection.id, outcome }),
      });
      workers.set(connection.id, worker);
      app.daemons.push(worker);
    }
    app.decorate('deliveryWorkers', workers);
    // A hook's delivered change is written leased to this process's worker and sent as it commits.
    app.changeWriter.deliverThrough((connectionId) => workers.get(connectionId));
  },
  { name: 'delivery', dependencies: ['config', 'db', 'daemons', 'metrics'] },
);
