// OAuth2 as Clio serves it: a consent page at /oauth/authorize, a form-encoded token endpoint
// at /oauth/token, errors as RFC 6749 §5.2 JSON.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { OAuthError } from './oauth-store.js';
import type { OAuthClient, TokenResponse } from './oauth-store.js';
import { requestMeta } from './request-meta.js';
import type { SandboxState } from './state.js';

type Params = Record<string, string | undefined>;

const escapeHtml = (s: string): string =>
  s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c] ?? c);

function redirectWith(uri: string, params: Record<string, string | undefined>): string {
  const url = new URL(uri);
  for (const [k, v] of Object.entries(params)) if (v !== undefined) url.searchParams.set(k, v);
  return url.toString();
}

function consentPage(client: OAuthClient, q: Params, prefix: string): string {
  const hidden = ['client_id', 'redirect_uri', 'state', 'response_type', 'scope']
    .map((k) => (q[k] === undefined ? '' : `<input type="hidden" name="${k}" value="${escapeHtml(q[k] ?? '')}">`))
    .join('');
  return `<!doctype html><html><head><title>Authorize application</title></head><body>
<h1>Sandbox CRM</h1><p><strong>${escapeHtml(client.clientId)}</strong> would like to access your sandbox CRM data.</p>
<form method="post" action="${prefix}/oauth/authorize">${hidden}
<button type="submit" name="decision" value="approve" id="approve">Allow access</button>
<button type="submit" name="decision" value="deny" id="deny">Deny</button></form></body></html>`;
}

export interface OAuthRouteOptions {
  state: SandboxState;
  autoApprove: () => boolean;
  /** Where these routes are mounted ('' or '/documented'), for the consent form's action. Not
   * named `prefix`: Fastify would take that as the plugin's route prefix. */
  mountedAt: string;
}

/** Extracts client credentials from HTTP Basic or the form body (both are allowed by RFC 6749 §2.3.1). */
export function clientCredentialsOf(req: FastifyRequest, body: Params): { id: string | undefined; secret: string | undefined } {
  const basic = /^Basic\s+(.+)$/i.exec(req.headers.authorization ?? '');
  if (basic?.[1]) {
    const [id, secret] = Buffer.from(basic[1], 'base64').toString('utf8').split(':');
    return { id: id === undefined ? undefined : decodeURIComponent(id), secret: secret === undefined ? undefined : decodeURIComponent(secret) };
  }
  return { id: body.client_id, secret: body.client_secret };
}

export function sendOAuthError(reply: FastifyReply, err: unknown): FastifyReply {
  if (err instanceof OAuthError) {
    return reply.code(err.status).header('Cache-Control', 'no-store').send({ error: err.error, error_description: err.description });
  }
  throw err;
}

export async function oauthRoutes(app: FastifyInstance, opts: OAuthRouteOptions): Promise<void> {
  const { state } = opts;

  app.get('/oauth/authorize', async (req, reply) => {
    const q = req.query as Params;
    let client: OAuthClient;
    try {
      client = state.oauth.checkAuthorizeRequest(q.client_id, q.redirect_uri);
    } catch (err) {
      // Never redirect to an unverified redirect_uri (RFC 6749 §4.1.2.1): show the error instead.
      const message = err instanceof Error ? err.message : 'invalid request';
      return reply.code(400).type('text/html; charset=utf-8').send(`<!doctype html><html><body><h1>Authorization error</h1><p>${escapeHtml(message)}</p></body></html>`);
    }
    const redirectUri = q.redirect_uri as string;
    if (q.response_type !== 'code') {
      return reply.redirect(redirectWith(redirectUri, { error: 'unsupported_response_type', state: q.state }));
    }
    if (opts.autoApprove()) {
      return reply.redirect(redirectWith(redirectUri, { code: state.oauth.createCode(client.clientId, redirectUri), state: q.state }));
    }
    return reply.type('text/html; charset=utf-8').send(consentPage(client, q, opts.mountedAt));
  });

  app.post('/oauth/authorize', async (req, reply) => {
    const body = (req.body ?? {}) as Params;
    let client: OAuthClient;
    try {
      client = state.oauth.checkAuthorizeRequest(body.client_id, body.redirect_uri);
    } catch (err) {
      return reply.code(400).type('text/html; charset=utf-8').send(`<p>${escapeHtml(err instanceof Error ? err.message : 'invalid request')}</p>`);
    }
    const redirectUri = body.redirect_uri as string;
    if (body.decision !== 'approve') return reply.redirect(redirectWith(redirectUri, { error: 'access_denied', state: body.state }));
    return reply.redirect(redirectWith(redirectUri, { code: state.oauth.createCode(client.clientId, redirectUri), state: body.state }));
  });

  app.post('/oauth/token', async (req, reply) => {
    const body = (req.body ?? {}) as Params;
    const creds = clientCredentialsOf(req, body);
    const meta = requestMeta(req);
    meta.auth = { scheme: 'client', ...(creds.id ? { clientId: creds.id } : {}), ...(body.grant_type ? { grantType: body.grant_type } : {}) };
    try {
      const client = state.oauth.authenticateClient(creds.id, creds.secret);
      let token: TokenResponse;
      switch (body.grant_type) {
        case 'authorization_code':
          token = state.oauth.exchangeCode(client, body.code, body.redirect_uri);
          break;
        case 'refresh_token':
          token = state.oauth.refreshGrant(client, body.refresh_token);
          break;
        case 'client_credentials':
          token = state.oauth.clientCredentials(client);
          break;
        case undefined:
          throw new OAuthError('invalid_request', 'grant_type is required');
        default:
          throw new OAuthError('unsupported_grant_type', `grant_type ${body.grant_type} is not supported`);
      }
      const named = state.oauth.describe(token.access_token);
      if (named) meta.auth = { ...meta.auth, grantId: named.grantId, tokenId: named.tokenId };
      return reply.header('Cache-Control', 'no-store').send(token);
    } catch (err) {
      return sendOAuthError(reply, err);
    }
  });
}
