import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import { loadTokenKey, TokenCipher } from '../crm/crypto.js';
import { createTokenManager, type TokenManager } from '../crm/token-manager.js';
import type { TokenProvider } from '../crm/token-provider.js';

export interface TokenManagers {
  /** The connection's TokenProvider for the CRM HTTP client; undefined when its auth is `none`. */
  get(connectionId: string): TokenProvider | undefined;
  /** The manager itself, for the OAuth routes (authorization URL, code exchange). */
  manager(connectionId: string): TokenManager | undefined;
  /** Encrypts tokens and signs OAuth state; undefined when no connection has auth. */
  cipher: TokenCipher | undefined;
}

declare module 'fastify' {
  interface FastifyInstance {
    tokens: TokenManagers;
  }
}

/**
 * One token manager per connection with auth, sharing the app's database. The encryption key
 * is loaded only when some connection needs it, so a Postgres deployment without a key fails
 * at start exactly when it would store tokens it could not share between replicas.
 */
export default fp(
  async (app: FastifyInstance) => {
    const { env } = app.config;
    const withAuth = [...app.connections.values()].filter((c) => c.auth.type !== 'none');
    const cipher =
      withAuth.length === 0 ? undefined : new TokenCipher(loadTokenKey({ key: env.TOKEN_ENCRYPTION_KEY, driver: app.database.driver, dataDir: env.DATA_DIR }));
    const managers = new Map<string, TokenManager>();
    for (const connection of withAuth) {
      managers.set(
        connection.id,
        createTokenManager(app.db, connection, {
          cipher: cipher!,
          logger: app.log.child({ component: 'tokens' }),
          instanceId: env.INSTANCE_ID,
          onRefresh: (outcome) => app.metrics.tokenRefreshes.inc({ connection: connection.id, outcome }),
        }),
      );
    }
    // Before the pool closes (close hooks run in reverse order): a refresh in flight is stored, or a rotated refresh token is lost.
    app.addHook('onClose', async () => {
      await Promise.all([...managers.values()].map((m) => m.drain()));
    });
    app.decorate('tokens', {
      get: (connectionId: string) => managers.get(connectionId),
      manager: (connectionId: string) => managers.get(connectionId),
      cipher,
    } satisfies TokenManagers);
  },
  { name: 'tokens', dependencies: ['config', 'db', 'metrics'] },
);
