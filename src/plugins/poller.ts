import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { pollObjects } from '../config/schema.js';
import { PollDaemon, type StreamContext } from '../sync/poller.js';
import { recordRun } from './metrics.js';

declare module 'fastify' {
  interface FastifyInstance {
    poller: {
      /** What a poll or sweep of one stream needs, for the daemons, the CLI and tests. */
      stream(connectionId: string, object: string): StreamContext;
      daemons: PollDaemon[];
      /** Runs a connection's streams now instead of at their next interval (say, once it is authorised). */
      wake(connectionId: string): void;
      /** A notification hook for the stream was stored: its record is fetched now, if this replica polls the stream. */
      notified(connectionId: string, object: string): void;
    };
  }
}

/**
 * A poll daemon per (connection, object) stream on every replica; the stream's lease lets one
 * of them work at a time and hands the stream over when its holder dies.
 */
export default fp(
  async (app: FastifyInstance) => {
    const owner = `${app.config.env.INSTANCE_ID ?? `${hostname()}:${process.pid}`}:${randomUUID().slice(0, 8)}`;
    const log = app.log.child({ component: 'poller' });
    const stream = (connectionId: string, object: string): StreamContext => {
      const connection = app.connections.get(connectionId);
      if (connection === undefined) throw new Error(`unknown connection ${connectionId}`);
      if (connection.connector.objects[object] === undefined) throw new Error(`connection ${connectionId} has no object ${object}`);
      return {
        db: app.db,
        connection,
        object,
        connector: app.crm.connector(connectionId),
        owner,
        log,
        onRun: (report, seconds) => {
          recordRun(app.metrics, report, seconds);
          // New changes are in the outbox: this replica's delivery worker need not wait for its next tick.
          if ((report.counts.accepted ?? 0) > 0) app.deliveryWorkers.get(connectionId)?.wake();
        },
        onFetched: () => app.deliveryWorkers.get(connectionId)?.wake(),
      };
    };
    const daemons: PollDaemon[] = [];
    const byConnection = new Map<string, Map<string, PollDaemon>>();
    for (const connection of app.connections.values()) {
      const byObject = new Map<string, PollDaemon>();
      byConnection.set(connection.id, byObject);
      for (const object of pollObjects(connection)) {
        const daemon = new PollDaemon(stream(connection.id, object));
        daemons.push(daemon);
        app.daemons.push(daemon);
        byObject.set(object, daemon);
      }
    }
    const wake = (connectionId: string) => {
      for (const daemon of byConnection.get(connectionId)?.values() ?? []) daemon.wake();
    };
    const notified = (connectionId: string, object: string) => byConnection.get(connectionId)?.get(object)?.notified();
    app.decorate('poller', { stream, daemons, wake, notified });
  },
  { name: 'poller', dependencies: ['config', 'db', 'daemons', 'crm', 'metrics'] },
);
