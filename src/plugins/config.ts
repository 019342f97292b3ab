import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import type { Config } from '../config/load.js';
import type { ConnectionConfig } from '../config/schema.js';
import { sha256 } from '../security.js';

export interface Connection extends ConnectionConfig {
  /** Digests of the accepted hook secrets; the secrets themselves are not kept around. */
  hookSecretHashes: Buffer[];
}

declare module 'fastify' {
  interface FastifyInstance {
    config: Config;
    connections: Map<string, Connection>;
    /** When this process last received an authenticated hook, per connection (duplicates included). */
    hookActivity: Map<string, Date>;
  }
}

export default fp(
  async (app: FastifyInstance, opts: { config: Config }) => {
    app.decorate('config', opts.config);
    app.decorate('hookActivity', new Map<string, Date>());
    app.decorate(
      'connections',
      new Map(opts.config.connections.map((c) => [c.id, { ...c, hookSecretHashes: c.inbound.secrets.map(sha256) }])),
    );
  },
  { name: 'config' },
);
