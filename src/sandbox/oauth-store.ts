// Grants and tokens of the sandbox's OAuth2 server. Token strings are random and opaque; every
// log and control answer names tokens by their short id (`at-3`, `rt-2`) and grant (`g-1`),
// never by the secret itself.
import { randomBytes } from 'node:crypto';
import type { SandboxSwitches } from './switches.js';

export interface OAuthClient {
  clientId: string;
  clientSecret: string;
  redirectUris?: string[];
}

export interface Grant {
  id: string;
  clientId: string;
  kind: 'authorization_code' | 'client_credentials' | 'control';
  createdAt: number;
  revokedAt: number | null;
  revokedReason: string | null;
}

interface AccessToken {
  id: string;
  grantId: string;
  issuedAt: number;
  expiresIn: number;
  forcedExpired: boolean;
}

interface RefreshToken {
  id: string;
  grantId: string;
  state: 'active' | 'rotated';
}

interface AuthCode {
  clientId: string;
  redirectUri: string | null;
  grantId: string | null;
  expiresAt: number;
  used: boolean;
}

export interface TokenResponse {
  access_token: string;
  token_type: 'bearer';
  expires_in: number;
  refresh_token?: string;
}

export class OAuthError extends Error {
  constructor(
    readonly error: 'invalid_grant' | 'invalid_client' | 'unsupported_grant_type' | 'invalid_request' | 'unauthorized_client',
    readonly description: string,
    readonly status = error === 'invalid_client' ? 401 : 400,
  ) {
    super(description);
  }
}

export type AccessCheck =
  | { ok: true; tokenId: string; grantId: string }
  | { ok: false; reason: 'missing' | 'unknown' | 'expired' | 'revoked'; tokenId?: string; grantId?: string };

const AUTH_CODE_LIFETIME_MS = 10 * 60_000;

export class OAuthStore {
  readonly clients = new Map<string, OAuthClient>();
  readonly grants = new Map<string, Grant>();
  private readonly access = new Map<string, AccessToken>();
  private readonly refresh = new Map<string, RefreshToken>();
  private readonly codes = new Map<string, AuthCode>();
  private seq = 0;

  constructor(
    clients: OAuthClient[],
    private readonly now: () => number,
    private readonly switches: () => SandboxSwitches,
  ) {
    for (const c of clients) this.clients.set(c.clientId, c);
  }

  authenticateClient(clientId: string | undefined, clientSecret: string | undefined): OAuthClient {
    const client = clientId === undefined ? undefined : this.clients.get(clientId);
    if (!client || client.clientSecret !== clientSecret) throw new OAuthError('invalid_client', 'Client authentication failed');
    return client;
  }

  /** Checks client and redirect_uri for the authorize endpoint; throws a message for the error page. */
  checkAuthorizeRequest(clientId: string | undefined, redirectUri: string | undefined): OAuthClient {
    const client = clientId === undefined ? undefined : this.clients.get(clientId);
    if (!client) throw new OAuthError('invalid_client', `Unknown client_id ${JSON.stringify(clientId ?? '')}`);
    if (!redirectUri) throw new OAuthError('invalid_request', 'redirect_uri is required');
    if (client.redirectUris?.length && !client.redirectUris.includes(redirectUri)) {
      throw new OAuthError('invalid_request', 'redirect_uri is not registered for this client');
    }
    return client;
  }

  createCode(clientId: string, redirectUri: string): string {
    const code = randomBytes(16).toString('base64url');
    this.codes.set(code, { clientId, redirectUri, grantId: null, expiresAt: this.now() + AUTH_CODE_LIFETIME_MS, used: false });
    return code;
  }

  exchangeCode(client: OAuthClient, code: string | undefined, redirectUri: string | undefined, expiresIn?: number): TokenResponse {
    if (!code) throw new OAuthError('invalid_request', 'code is required');
    const rec = this.codes.get(code);
    if (!rec || rec.clientId !== client.clientId) throw new OAuthError('invalid_grant', 'Authorization code is invalid');
    if (rec.used) {
      // RFC 6749 §4.1.2: a replayed code should revoke what it issued.
      if (rec.grantId) this.revokeGrant(rec.grantId, 'authorization code replayed');
      throw new OAuthError('invalid_grant', 'Authorization code has already been used');
    }
    if (rec.expiresAt <= this.now()) throw new OAuthError('invalid_grant', 'Authorization code has expired');
    if (rec.redirectUri !== null && redirectUri !== rec.redirectUri) throw new OAuthError('invalid_grant', 'redirect_uri does not match');
    rec.used = true;
    const grant = this.newGrant(client.clientId, 'authorization_code');
    rec.grantId = grant.id;
    return { ...this.issueAccess(grant.id, expiresIn), refresh_token: this.issueRefresh(grant.id) };
  }

  /**
   * `dialect.echoRefreshToken`: HubSpot answers every refresh with the (unchanged) refresh token;
   * Clio leaves it out. `dialect.expiresIn` overrides the advertised lifetime (HubSpot: 1800).
   */
  refreshGrant(client: OAuthClient, token: string | undefined, dialect: { echoRefreshToken?: boolean; expiresIn?: number } = {}): TokenResponse {
    if (!token) throw new OAuthError('invalid_request', 'refresh_token is required');
    const rec = this.refresh.get(token);
    const grant = rec ? this.grants.get(rec.grantId) : undefined;
    if (!rec || !grant || grant.clientId !== client.clientId) throw new OAuthError('invalid_grant', 'Refresh token is invalid');
    if (grant.revokedAt !== null) throw new OAuthError('invalid_grant', 'Refresh token has been revoked');
    if (this.switches().revokeAll) throw new OAuthError('invalid_grant', 'The grant has been revoked');
    if (rec.state === 'rotated') {
      this.revokeGrant(grant.id, `rotated refresh token ${rec.id} reused`);
      throw new OAuthError('invalid_grant', 'Refresh token was already used; the grant has been revoked');
    }
    const access = this.issueAccess(grant.id, dialect.expiresIn);
    if (!this.switches().rotateRefreshTokens) return dialect.echoRefreshToken ? { ...access, refresh_token: token } : access;
    rec.state = 'rotated';
    return { ...access, refresh_token: this.issueRefresh(grant.id) };
  }

  clientCredentials(client: OAuthClient): TokenResponse {
    return this.issueAccess(this.newGrant(client.clientId, 'client_credentials').id);
  }

  /** For tests and the control API: a fresh authorization-code-like grant without the browser dance. */
  issueDirect(clientId: string): TokenResponse & { grant_id: string } {
    const grant = this.newGrant(clientId, 'control');
    return { ...this.issueAccess(grant.id), refresh_token: this.issueRefresh(grant.id), grant_id: grant.id };
  }

  checkAccess(token: string | undefined): AccessCheck {
    if (!token) return { ok: false, reason: 'missing' };
    const rec = this.access.get(token);
    if (!rec) return { ok: false, reason: 'unknown' };
    const grant = this.grants.get(rec.grantId);
    const ids = { tokenId: rec.id, grantId: rec.grantId };
    if (!grant || grant.revokedAt !== null) return { ok: false, reason: 'revoked', ...ids };
    const real = this.switches().tokenRealLifetimeSeconds;
    const lifetime = Math.min(rec.expiresIn, real ?? Infinity) * 1000;
    if (rec.forcedExpired || this.now() >= rec.issuedAt + lifetime) return { ok: false, reason: 'expired', ...ids };
    return { ok: true, ...ids };
  }

  /** Names a token for the request log without revealing it. */
  describe(token: string): { tokenId: string; grantId: string } | null {
    const rec = this.access.get(token);
    return rec ? { tokenId: rec.id, grantId: rec.grantId } : null;
  }

  revokeGrant(grantId: string, reason: string): boolean {
    const grant = this.grants.get(grantId);
    if (!grant || grant.revokedAt !== null) return false;
    grant.revokedAt = this.now();
    grant.revokedReason = reason;
    return true;
  }

  revokeAllGrants(reason: string): number {
    let n = 0;
    for (const id of this.grants.keys()) if (this.revokeGrant(id, reason)) n++;
    return n;
  }

  expireAccessTokens(grantId?: string): number {
    let n = 0;
    for (const rec of this.access.values()) {
      if (grantId !== undefined && rec.grantId !== grantId) continue;
      if (!rec.forcedExpired) n++;
      rec.forcedExpired = true;
    }
    return n;
  }

  listGrants(): Array<Grant & { accessTokens: number; refreshTokens: { id: string; state: string }[] }> {
    return [...this.grants.values()].map((g) => ({
      ...g,
      accessTokens: [...this.access.values()].filter((a) => a.grantId === g.id).length,
      refreshTokens: [...this.refresh.values()].filter((r) => r.grantId === g.id).map((r) => ({ id: r.id, state: r.state })),
    }));
  }

  private newGrant(clientId: string, kind: Grant['kind']): Grant {
    const grant: Grant = { id: `g-${++this.seq}`, clientId, kind, createdAt: this.now(), revokedAt: null, revokedReason: null };
    this.grants.set(grant.id, grant);
    return grant;
  }

  private issueAccess(grantId: string, expiresInOverride?: number): TokenResponse {
    const token = randomBytes(24).toString('base64url');
    const expiresIn = expiresInOverride ?? this.switches().advertisedExpiresInSeconds;
    this.access.set(token, { id: `at-${++this.seq}`, grantId, issuedAt: this.now(), expiresIn, forcedExpired: false });
    return { access_token: token, token_type: 'bearer', expires_in: expiresIn };
  }

  private issueRefresh(grantId: string): string {
    const token = randomBytes(24).toString('base64url');
    this.refresh.set(token, { id: `rt-${++this.seq}`, grantId, state: 'active' });
    return token;
  }
}
