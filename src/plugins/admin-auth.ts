import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import { UnauthorizedError } from '../errors.js';
import { bearerToken, matchesAnySecret, sha256 } from '../security.js';

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * An onRequest hook for operator pages (status page, /docs): `Authorization: Bearer
     * $ADMIN_TOKEN`, or HTTP basic with any user name and ADMIN_TOKEN as the password so a
     * browser can open them. Anything else: 401 with a Basic challenge and the one 401 body.
     */
    requireAdmin: (request: FastifyRequest, reply: FastifyReply) => Promise<void>;
  }
}

export const ADMIN_REALM = 'crm-bridge';

/** The password of a `Basic` Authorization header, or undefined. The user name is ignored. */
export function basicPassword(header: string | string[] | undefined): string | undefined {
  if (typeof header !== 'string') return undefined;
  const match = /^Basic[ ]+([A-Za-z0-9+/=]+)\s*$/i.exec(header);
  if (!match) return undefined;
  const decoded = Buffer.from(match[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon < 0 ? undefined : decoded.slice(colon + 1);
}

export default fp(
  async (app: FastifyInstance) => {
    const token = app.config.env.ADMIN_TOKEN;
    // With ADMIN_TOKEN unset nothing matches: operator pages are closed, never open by default.
    const adminHashes = token === undefined ? undefined : [sha256(token)];
    app.decorate('requireAdmin', async (request: FastifyRequest, reply: FastifyReply) => {
      const presented = bearerToken(request.headers.authorization) ?? basicPassword(request.headers.authorization);
      if (!matchesAnySecret(presented, adminHashes)) {
        request.log.warn({ url: request.url.split('?')[0] }, 'operator request rejected: missing or invalid admin credential');
        // The challenge is what makes a browser ask for the login; the body is the usual 401.
        reply.header('www-authenticate', `Basic realm="${ADMIN_REALM}", charset="UTF-8"`);
        throw new UnauthorizedError();
      }
    });
  },
  { name: 'admin-auth', dependencies: ['config'] },
);
