import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { RetentionDaemon } from '../sync/retention.js';

declare module 'fastify' {
  interface FastifyInstance {
    /** The daily prune of old record bodies; tests tick it or call pruneExpiredBodies directly. */
    retention: RetentionDaemon;
  }
}

/** Registers the retention daemon with the others; every replica runs it, the lease picks one. */
export default fp(
  async (app: FastifyInstance) => {
    const instance = app.config.env.INSTANCE_ID ?? `${hostname()}:${process.pid}`;
    const daemon = new RetentionDaemon({
      db: app.db,
      retentionDays: app.config.env.RETENTION_DAYS,
      // The random part keeps two apps in one process (tests, a restart racing its old self) apart.
      owner: `${instance}:${randomUUID().slice(0, 8)}`,
      log: app.log,
    });
    app.daemons.push(daemon);
    app.decorate('retention', daemon);
  },
  { name: 'retention', dependencies: ['config', 'db', 'daemons'] },
);
