import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyBaseLogger } from 'fastify';
import type { AuthConfig } from '../config/schema.js';
import type { Db } from '../db/client.js';
import { acquireLease, releaseLease, renewLease } from '../db/queries/leases.js';
import {
  getTokenRow,
  markNeedsReauth,
  recordTokenError,
  saveGrantedTokens,
  saveRefreshedTokens,
  type SealedTokens,
  type TokenRow,
} from '../db/queries/tokens.js';
import { AppError } from '../errors.js';
import { errorClass } from '../privacy.js';
import type { TokenCipher } from './crypto.js';
import { createCrmHttpClient, CrmHttpError, type CrmHttpClient } from './http-client.js';
import { NeedsReauthError, reauthHint, type TokenProvider } from './token-provider.js';

/**
 * The OAuth2 token manager (DESIGN "OAuth2 token manager"). One instance per connection and
 * process; the database row is the truth shared by every replica, this object only caches it.
 *
 * Invariants:
 * - At most one token request per connection at a time across all replicas: in-process callers
 *   share one promise, and replicas serialise on the lease `token:<connection>`, which is a row
 *   with an expiry, never a lock held across the HTTP call.
 * - After taking the lease the row is read again: another replica may have refreshed already,
 *   and then its token is used without calling the CRM. Reusing a refresh token that rotated
 *   makes some CRMs revoke the whole grant (RFC 9700 §4.14.2), so this matters.
 * - A refreshed (possibly rotated) token pair is committed before the access token is returned.
 * - `invalid_grant` (confirmed by re-reading the row) stops everything for the connection:
 *   state `needs_reauth`, one error log line, and later callers fail without HTTP until an
 *   operator re-authorises. Transient failures (5xx, 429, network) back off and are not that.
 */

type ActiveAuth = Exclude<AuthConfig, { type: 'none' }>;
type Logger = Pick<FastifyBaseLogger, 'info' | 'warn' | 'error'>;

/** The parts of a connection the token manager needs (a ConnectionConfig fits). */
export interface TokenConnection {
  id: string;
  auth: AuthConfig;
  baseUrl?: string | undefined;
  connector?: { baseUrl?: string | undefined; rateLimit?: { retryAfterUnit?: 'seconds' | 'milliseconds' } | undefined } | undefined;
}

export interface TokenManagerOptions {
  cipher: TokenCipher;
  logger?: Logger | undefined;
  /** Names this process in lease rows (INSTANCE_ID); defaults to host:pid. */
  instanceId?: string | undefined;
  /** Timeout of one token-endpoint request. The lease outlives it, so a slow answer cannot overlap another replica's. */
  requestTimeoutMs?: number;
  /** Attempts at the token endpoint per refresh when it fails transiently. */
  attempts?: number;
  /** Exponential backoff between those attempts: base × 2^(n-1) with jitter, capped. (A 429's Retry-After is waited out by the HTTP client.) */
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  /** How long a caller waits for another replica's refresh before giving up (transiently). */
  waitForOtherMs?: number;
  now?: () => number;
  /** Told how each refresh at the token endpoint ended (metrics). */
  onRefresh?: ((outcome: 'refreshed' | 'needs_reauth' | 'rejected' | 'unavailable') => void) | undefined;
}

/** The token endpoint kept failing transiently; the grant itself is fine. */
export class TokenEndpointError extends AppError {
  constructor(connectionId: string, detail: string, options?: { cause?: unknown }) {
    super(503, 'TOKEN_ENDPOINT_UNAVAILABLE', `Connection ${connectionId}: the token endpoint is unavailable (${detail})`, options);
    this.name = 'TokenEndpointError';
  }
}

/** The token endpoint refused a request in a way retrying will not fix (bad client credentials, a bad code). */
export class TokenRequestRejectedError extends AppError {
  constructor(connectionId: string, detail: string) {
    super(502, 'TOKEN_REQUEST_REJECTED', `Connection ${connectionId}: the token endpoint refused the request (${detail})`);
    this.name = 'TokenRequestRejectedError';
  }
}

/** `tokenUrl`/`authorizeUrl` may be paths: they resolve against the connection's (or the connector's) base URL. */
export function resolveAuthUrl(url: string, connection: TokenConnection): string {
  if (!url.startsWith('/')) return url;
  const base = connection.baseUrl ?? connection.connector?.baseUrl;
  if (base === undefined) {
    throw new AppError(500, 'CONFIG_INVALID', `Connection ${connection.id}: auth URL ${url} is a path, but the connection has no baseUrl to resolve it against`);
  }
  return new URL(url, base).toString();
}

export function createTokenManager(db: Db, connection: TokenConnection, options: TokenManagerOptions): TokenManager {
  const auth = connection.auth;
  if (auth.type === 'none') throw new Error(`connection ${connection.id} has auth type none: it has no tokens to manage`);
  return new TokenManager(db, connection, auth, options);
}

interface CachedToken {
  token: string;
  expiresAt: number | null;
  marginMs: number;
}

type TokenAnswer =
  | { kind: 'ok'; accessToken: string; refreshToken: string | undefined; expiresIn: number | undefined }
  | { kind: 'invalid_grant'; detail: string }
  | { kind: 'rejected'; error: string; detail: string }
  | { kind: 'transient'; detail: string; retryAfterMs?: number | undefined };

const LEASE_MARGIN_MS = 5_000;
/** Retries the HTTP client may make itself: only for answers the CRM did not act on (429, refused). */
const CLIENT_RETRIES = 2;

export class TokenManager implements TokenProvider {
  readonly connectionId: string;
  readonly auth: ActiveAuth;
  readonly tokenUrl: string | undefined;
  readonly #db: Db;
  readonly #connection: TokenConnection;
  readonly #cipher: TokenCipher;
  readonly #log: Logger | undefined;
  readonly #onRefresh: TokenManagerOptions['onRefresh'];
  readonly #leaseName: string;
  readonly #owner: string;
  readonly #timeoutMs: number;
  readonly #leaseTtlMs: number;
  readonly #attempts: number;
  readonly #backoffBaseMs: number;
  readonly #backoffMaxMs: number;
  readonly #waitForOtherMs: number;
  readonly #now: () => number;
  readonly #http: CrmHttpClient | undefined;
  #cache: CachedToken | null = null;
  #inflight: Promise<string> | null = null;
  /** Client credentials and static tokens have no grant to re-authorise; the flag stops retries in this process. */
  #rejectedHere: string | null = null;
  #staticChecked = false;
  /** After a refresh round failed transiently: no token request before this time (this process). */
  #retryAt = 0;

  constructor(db: Db, connection: TokenConnection, auth: ActiveAuth, options: TokenManagerOptions) {
    this.#db = db;
    this.#connection = connection;
    this.connectionId = connection.id;
    this.auth = auth;
    this.tokenUrl = auth.type === 'static' ? undefined : resolveAuthUrl(auth.tokenUrl, connection);
    this.#cipher = options.cipher;
    this.#log = options.logger;
    this.#onRefresh = options.onRefresh;
    this.#leaseName = `token:${connection.id}`;
    this.#owner = `${options.instanceId ?? `${hostname()}:${process.pid}`}:${randomBytes(4).toString('hex')}`;
    this.#timeoutMs = options.requestTimeoutMs ?? 15_000;
    // Outlasts the longest one request can take in the client: every attempt timing out, and
    // each retry's wait (Retry-After, backoff) capped at the timeout too.
    this.#leaseTtlMs = this.#timeoutMs * (2 * CLIENT_RETRIES + 1) + LEASE_MARGIN_MS;
    this.#attempts = options.attempts ?? 5;
    this.#backoffBaseMs = options.backoffBaseMs ?? 500;
    this.#backoffMaxMs = options.backoffMaxMs ?? 30_000;
    this.#waitForOtherMs = options.waitForOtherMs ?? this.#leaseTtlMs * 2;
    this.#now = options.now ?? Date.now;
    this.#http =
      this.tokenUrl === undefined
        ? undefined
        : createCrmHttpClient({
            baseUrl: this.tokenUrl,
            timeoutMs: this.#timeoutMs,
            maxRetries: CLIENT_RETRIES,
            retryAfterUnit: connection.connector?.rateLimit?.retryAfterUnit ?? 'seconds',
            // Longer waits belong to this class's backoff, where the lease is renewed around them.
            maxRetryAfterMs: this.#timeoutMs,
            retryMaxMs: this.#timeoutMs,
            pacing: false,
          });
  }

  async getAccessToken(signal?: AbortSignal): Promise<string> {
    signal?.throwIfAborted();
    if (this.auth.type === 'static') return this.#staticToken();
    const cached = this.#cache;
    if (cached && this.#isFresh(cached)) return cached.token;
    return withSignal(this.#shared(undefined), signal);
  }

  async handleUnauthorized(rejected: string, signal?: AbortSignal): Promise<string> {
    signal?.throwIfAborted();
    if (this.auth.type === 'static') return this.#rejectStatic(rejected);
    const cached = this.#cache;
    if (cached && cached.token !== rejected && this.#isFresh(cached)) return cached.token;
    let token = await withSignal(this.#shared(rejected), signal);
    // Joined a refresh started for another reason, which may have settled on the very token the
    // CRM just refused: refresh once more, for this token.
    if (token === rejected) token = await withSignal(this.#shared(rejected), signal);
    return token;
  }

  /** Where to send the operator's browser to grant access (authorization-code bootstrap). */
  authorizationUrl(params: { state: string; redirectUri: string }): string {
    if (this.auth.type !== 'oauth2') throw new Error(`connection ${this.connectionId} does not use the authorization-code grant`);
    const url = new URL(resolveAuthUrl(this.auth.authorizeUrl, this.#connection));
    url.searchParams.set('response_type', 'code');
    url.searchParams.set('client_id', this.auth.clientId);
    url.searchParams.set('redirect_uri', params.redirectUri);
    if (this.auth.scopes.length > 0) url.searchParams.set('scope', this.auth.scopes.join(' '));
    url.searchParams.set('state', params.state);
    return url.toString();
  }

  /**
   * Completes the authorization-code bootstrap: exchanges the code, stores the grant, and the
   * connection is usable again. Not retried: a code is single-use, and replaying one makes the
   * CRM revoke what it issued (RFC 6749 §4.1.2).
   */
  async exchangeCode(code: string, redirectUri: string): Promise<{ claimedLifetimeSeconds: number | null; hasRefreshToken: boolean }> {
    if (this.auth.type !== 'oauth2') throw new Error(`connection ${this.connectionId} does not use the authorization-code grant`);
    const answer = await this.#requestToken({ grant_type: 'authorization_code', code, redirect_uri: redirectUri });
    if (answer.kind === 'transient') throw new TokenEndpointError(this.connectionId, answer.detail);
    if (answer.kind === 'invalid_grant') throw new TokenRequestRejectedError(this.connectionId, `invalid_grant: ${answer.detail}`);
    if (answer.kind === 'rejected') throw new TokenRequestRejectedError(this.connectionId, `${answer.error}: ${answer.detail}`);
    if (answer.refreshToken === undefined) {
      this.#log?.warn({ connection: this.connectionId }, 'the CRM granted no refresh token: the connection will need re-authorising when the access token expires');
    }
    const sealed = this.#seal(answer);
    await saveGrantedTokens(this.#db, this.connectionId, sealed);
    this.#cache = this.#cacheOf(answer.accessToken, sealed.expiresAt, sealed.claimedLifetimeSeconds);
    this.#rejectedHere = null;
    this.#log?.info({ connection: this.connectionId, claimedLifetimeSeconds: sealed.claimedLifetimeSeconds }, 'connection authorised');
    return { claimedLifetimeSeconds: sealed.claimedLifetimeSeconds, hasRefreshToken: answer.refreshToken !== undefined };
  }

  // ---- shared refresh -------------------------------------------------------------------------

  /** Shutting down: no new token request; the one in flight is awaited and stored (`drain`). */
  #draining = false;

  /** Waits for a token request in flight to be answered and stored, and starts no other: call before the database closes. */
  async drain(): Promise<void> {
    this.#draining = true;
    await this.#inflight?.catch(() => {});
  }

  /** One promise per connection in this process; callers join it rather than starting their own. */
  #shared(rejected: string | undefined): Promise<string> {
    if (this.#inflight) return this.#inflight;
    if (this.#draining) return Promise.reject(new TokenEndpointError(this.connectionId, 'this replica is shutting down'));
    const run = this.#obtain(rejected);
    this.#inflight = run;
    run
      .finally(() => {
        if (this.#inflight === run) this.#inflight = null;
      })
      .catch(() => {});
    return run;
  }

  async #obtain(rejected: string | undefined): Promise<string> {
    const row = await getTokenRow(this.#db, this.connectionId);
    const stored = this.#usable(row, rejected);
    if (stored !== null) return stored;
    if (this.#now() < this.#retryAt) {
      const standing = rejected === undefined ? this.#unexpired(row) : null;
      if (standing !== null) return standing;
      throw new TokenEndpointError(this.connectionId, `it failed recently; next try in ${Math.ceil((this.#retryAt - this.#now()) / 1000)} s`);
    }
    try {
      return await this.#refreshUnderLease(rejected);
    } catch (err) {
      // An early refresh that failed transiently is no reason to fail the call: the token it
      // was replacing has not expired yet (as far as the CRM claimed), so it is still worth a try.
      const standing = err instanceof TokenEndpointError && rejected === undefined ? this.#unexpired(row) : null;
      if (standing === null) throw err;
      this.#log?.warn({ connection: this.connectionId }, 'early token refresh failed; using the current token until it expires');
      return standing;
    }
  }

  #unexpired(row: TokenRow | undefined): string | null {
    if (!row?.accessTokenEnc || row.state !== 'ok' || row.expiresAt === null || row.expiresAt.getTime() <= this.#now()) return null;
    return this.#open(row.accessTokenEnc, 'access');
  }

  /** A stored value, or null when this key cannot decrypt it (TOKEN_ENCRYPTION_KEY changed or lost). */
  #open(sealed: string, kind: 'access' | 'refresh'): string | null {
    try {
      return this.#cipher.decrypt(sealed, this.#context(kind));
    } catch {
      return null;
    }
  }

  async #refreshUnderLease(rejected: string | undefined): Promise<string> {
    const deadline = this.#now() + this.#waitForOtherMs;
    for (;;) {
      if (await acquireLease(this.#db, this.#leaseName, this.#owner, this.#leaseTtlMs)) {
        try {
          const token = await this.#refreshHoldingLease(rejected);
          if (token !== null) return token;
          // Lost the lease while backing off: start over, someone else may be done by now.
        } finally {
          await releaseLease(this.#db, this.#leaseName, this.#owner).catch((err: unknown) =>
            this.#log?.warn({ connection: this.connectionId, err }, 'could not release the token lease; it will expire'),
          );
        }
      } else {
        // Another replica is refreshing. Its result is read once we hold the lease ourselves,
        // which it releases right after storing: one place decides between theirs and a refresh.
        await sleep(25 + Math.random() * 50);
      }
      if (this.#now() > deadline) throw new TokenEndpointError(this.connectionId, 'another replica held the token lease too long');
    }
  }

  /** Returns the token, or null if the lease was lost on the way. Throws NeedsReauthError and the endpoint errors. */
  async #refreshHoldingLease(rejected: string | undefined): Promise<string | null> {
    let failures = 0;
    let rereads = 0;
    for (;;) {
      const row = await getTokenRow(this.#db, this.connectionId);
      const theirs = this.#usable(row, rejected);
      if (theirs !== null) return theirs;

      if (this.auth.type === 'oauth2' && !row?.refreshTokenEnc) {
        throw await this.#needsReauth('no refresh token is stored (the CRM granted none); authorise the connection again', row?.generation);
      }
      if (this.auth.type === 'oauth2' && this.#open(row!.refreshTokenEnc!, 'refresh') === null) {
        throw await this.#needsReauth('the stored tokens cannot be decrypted: TOKEN_ENCRYPTION_KEY differs from the key that stored them; authorise the connection again', row?.generation);
      }
      const form = this.#refreshForm(row);
      const answer = await this.#requestToken(form);
      if (answer.kind === 'ok') {
        const sealed = this.#seal(answer);
        // The CRM may have rotated the refresh token: the answer is kept until it is stored (a dropped
        // connection or a database restart is waited out within the lease), or it is lost for good.
        const generation = await this.#store(row?.generation ?? 0, sealed);
        // null: an operator stored a newer grant meanwhile; the next turn reads and uses it.
        if (generation === null) continue;
        this.#cache = this.#cacheOf(answer.accessToken, sealed.expiresAt, sealed.claimedLifetimeSeconds);
        this.#onRefresh?.('refreshed');
        this.#log?.info({ connection: this.connectionId, grant: form.grant_type, claimedLifetimeSeconds: sealed.claimedLifetimeSeconds }, 'access token refreshed');
        return answer.accessToken;
      }

      if (answer.kind === 'invalid_grant' || (answer.kind === 'rejected' && this.auth.type === 'client_credentials')) {
        const reason = answer.kind === 'invalid_grant' ? `invalid_grant: ${answer.detail}` : `${answer.error}: ${answer.detail}`;
        // Re-read first: if the stored refresh token changed since we sent ours, ours was simply stale.
        const now = await getTokenRow(this.#db, this.connectionId);
        if (now && row && now.generation !== row.generation && rereads++ < 2) continue;
        this.#onRefresh?.('needs_reauth');
        throw await this.#needsReauth(reason, row?.generation);
      }

      if (answer.kind === 'rejected') {
        const message = `${answer.error}: ${answer.detail}`;
        await recordTokenError(this.#db, this.connectionId, message);
        this.#onRefresh?.('rejected');
        this.#log?.error({ connection: this.connectionId, error: answer.error }, `token refresh refused: ${message}; check the connection's client id and secret`);
        throw new TokenRequestRejectedError(this.connectionId, message);
      }

      failures++;
      const tooLong = answer.retryAfterMs !== undefined && answer.retryAfterMs > this.#backoffMaxMs;
      if (failures >= this.#attempts || tooLong) {
        this.#retryAt = this.#now() + Math.max(answer.retryAfterMs ?? 0, this.#backoffMaxMs);
        await recordTokenError(this.#db, this.connectionId, `token endpoint: ${answer.detail}`);
        this.#onRefresh?.('unavailable');
        this.#log?.warn({ connection: this.connectionId, attempts: failures }, `token endpoint still failing after ${failures} attempts: ${answer.detail}`);
        throw new TokenEndpointError(this.connectionId, answer.detail);
      }
      const delay = Math.max(this.#backoff(failures), answer.retryAfterMs ?? 0);
      this.#log?.warn({ connection: this.connectionId, attempt: failures, delayMs: Math.round(delay) }, `token endpoint failed transiently (${answer.detail}); retrying`);
      if (!(await renewLease(this.#db, this.#leaseName, this.#owner, delay + this.#leaseTtlMs))) return null;
      await sleep(delay);
      if (!(await renewLease(this.#db, this.#leaseName, this.#owner, this.#leaseTtlMs))) return null;
    }
  }

  /**
   * Stores a refresh's answer, retried (a dropped connection, a database restart) until the
   * token lease runs short: only this process holds the rotated refresh token. A save whose
   * commit landed and whose answer was lost finds its own generation on retry and returns null,
   * and the caller reads the row again.
   */
  async #store(fromGeneration: number, sealed: SealedTokens): Promise<number | null> {
    const until = this.#now() + this.#leaseTtlMs - LEASE_MARGIN_MS;
    for (let attempt = 1; ; attempt++) {
      try {
        return await saveRefreshedTokens(this.#db, this.connectionId, fromGeneration, sealed);
      } catch (err) {
        if (this.#now() > until) throw err;
        // The class only: a failed insert's error quotes its parameters, the sealed tokens.
        this.#log?.warn({ connection: this.connectionId, error: errorClass(err) }, 'storing the refreshed token failed; trying again');
        await sleep(Math.min(2_000, 100 * 2 ** attempt));
      }
    }
  }

  #refreshForm(row: TokenRow | undefined): Record<string, string> {
    const auth = this.auth;
    if (auth.type === 'client_credentials') {
      return { grant_type: 'client_credentials', ...(auth.scopes.length > 0 ? { scope: auth.scopes.join(' ') } : {}) };
    }
    if (!row?.refreshTokenEnc) throw new Error('unreachable: checked by the caller');
    return { grant_type: 'refresh_token', refresh_token: this.#cipher.decrypt(row.refreshTokenEnc, this.#context('refresh')) };
  }

  /**
   * The stored access token if it may be used: not the one the CRM refused, not within the
   * margin of its claimed expiry. Throws NeedsReauthError when the stored state says so.
   */
  #usable(row: TokenRow | undefined, rejected: string | undefined): string | null {
    if (this.auth.type === 'client_credentials') {
      if (this.#rejectedHere !== null) throw new NeedsReauthError(this.connectionId, this.#rejectedHere);
    } else if (row === undefined || row.state === 'needs_reauth') {
      throw new NeedsReauthError(this.connectionId, row?.lastError ?? `not authorised yet: ${reauthHint(this.connectionId, this.auth.type)}`);
    }
    if (!row?.accessTokenEnc) return null;
    const token = this.#open(row.accessTokenEnc, 'access');
    if (token === null || token === rejected) return null;
    const cached = this.#cacheOf(token, row.expiresAt, row.claimedLifetimeSeconds);
    if (!this.#isFresh(cached)) return null;
    this.#cache = cached;
    return token;
  }

  async #needsReauth(reason: string, atGeneration: number | undefined): Promise<NeedsReauthError> {
    this.#cache = null;
    if (this.auth.type !== 'oauth2') this.#rejectedHere = reason;
    const marked = await markNeedsReauth(this.#db, this.connectionId, reason, atGeneration);
    if (marked) {
      this.#log?.error(
        { connection: this.connectionId, reason },
        `connection ${this.connectionId} needs re-authorisation (${reason}); polling pauses until then: ${reauthHint(this.connectionId, this.auth.type)}`,
      );
    }
    return new NeedsReauthError(this.connectionId, reason);
  }

  // ---- static tokens --------------------------------------------------------------------------

  /**
   * A static token ("API key") cannot be refreshed. Its row records whether the CRM refused it;
   * a different configured token is taken as the operator's re-authorisation.
   */
  async #staticToken(): Promise<string> {
    if (this.auth.type !== 'static') throw new Error('unreachable');
    const token = this.auth.token;
    if (this.#rejectedHere !== null) throw new NeedsReauthError(this.connectionId, this.#rejectedHere);
    if (!this.#staticChecked) {
      const row = await getTokenRow(this.#db, this.connectionId);
      const stored = row?.accessTokenEnc ? this.#open(row.accessTokenEnc, 'access') : null;
      if (stored === token && row?.state === 'needs_reauth') {
        this.#rejectedHere = row.lastError ?? 'the CRM refused the static token';
        throw new NeedsReauthError(this.connectionId, this.#rejectedHere);
      }
      if (stored !== token) {
        await saveGrantedTokens(this.#db, this.connectionId, { accessTokenEnc: this.#cipher.encrypt(token, this.#context('access')), expiresAt: null, claimedLifetimeSeconds: null });
      }
      this.#staticChecked = true;
    }
    return token;
  }

  async #rejectStatic(rejected: string): Promise<string> {
    if (this.auth.type !== 'static') throw new Error('unreachable');
    if (this.#rejectedHere !== null) throw new NeedsReauthError(this.connectionId, this.#rejectedHere);
    const reason = 'the CRM answered 401 to the static token (it may be an expiring OAuth token under another name): replace it and restart';
    if (rejected !== this.auth.token) return this.#staticToken();
    this.#rejectedHere = reason;
    throw await this.#needsReauth(reason, undefined);
  }

  // ---- the token endpoint ---------------------------------------------------------------------

  /**
   * One form-encoded POST to the token endpoint, classified. The only HTTP this class does;
   * kept in one place so it can move onto the shared CRM HTTP client (with auth off).
   */
  async #requestToken(form: Record<string, string>): Promise<TokenAnswer> {
    if (this.auth.type === 'static' || this.tokenUrl === undefined) throw new Error('static tokens have no token endpoint');
    const body = new URLSearchParams(form);
    const headers: Record<string, string> = { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' };
    if (this.auth.clientAuth === 'basic') {
      const credentials = `${encodeURIComponent(this.auth.clientId)}:${encodeURIComponent(this.auth.clientSecret)}`;
      headers.authorization = `Basic ${Buffer.from(credentials, 'utf8').toString('base64')}`;
    } else {
      body.set('client_id', this.auth.clientId);
      body.set('client_secret', this.auth.clientSecret);
    }
    const answer = await postTokenForm(this.#http!, Object.fromEntries(body), headers);
    if ('failure' in answer) return { kind: 'transient', detail: answer.failure, retryAfterMs: answer.retryAfterMs };
    const { status, json } = answer;
    const field = (name: string): unknown => (json !== null && typeof json === 'object' ? (json as Record<string, unknown>)[name] : undefined);
    if (status >= 500 || status === 408) return { kind: 'transient', detail: `HTTP ${status}` };
    if (status >= 200 && status < 300) {
      const accessToken = field('access_token');
      if (typeof accessToken !== 'string' || accessToken === '') {
        if (json === null) return { kind: 'transient', detail: `HTTP ${status} with a non-JSON answer` };
        return { kind: 'rejected', error: 'invalid_response', detail: `HTTP ${status} without an access_token` };
      }
      const refreshToken = field('refresh_token');
      const expiresIn = Number(field('expires_in'));
      return {
        kind: 'ok',
        accessToken,
        refreshToken: typeof refreshToken === 'string' && refreshToken !== '' ? refreshToken : undefined,
        // Stored as an int4 of seconds: a fractional or huge claim must not fail the save after the CRM rotated the refresh token.
        expiresIn: Number.isFinite(expiresIn) && expiresIn > 0 ? Math.min(Math.max(1, Math.floor(expiresIn)), 10 * 365 * 86_400) : undefined,
      };
    }
    // No OAuth error object (RFC 6749 §5.2): a proxy's or load balancer's page, not the CRM's verdict.
    if (typeof field('error') !== 'string') return { kind: 'transient', detail: `HTTP ${status} without an OAuth error` };
    const error = field('error') as string;
    const description = typeof field('error_description') === 'string' ? (field('error_description') as string) : `HTTP ${status}`;
    if (error === 'invalid_grant') return { kind: 'invalid_grant', detail: description };
    return { kind: 'rejected', error, detail: description };
  }

  // ---- helpers --------------------------------------------------------------------------------

  #seal(answer: { accessToken: string; refreshToken: string | undefined; expiresIn: number | undefined }): SealedTokens {
    return {
      accessTokenEnc: this.#cipher.encrypt(answer.accessToken, this.#context('access')),
      // No refresh token in a refresh answer means the old one stays valid (Clio without rotation).
      refreshTokenEnc: answer.refreshToken === undefined ? undefined : this.#cipher.encrypt(answer.refreshToken, this.#context('refresh')),
      expiresAt: answer.expiresIn === undefined ? null : new Date(this.#now() + answer.expiresIn * 1000),
      claimedLifetimeSeconds: answer.expiresIn ?? null,
    };
  }

  #cacheOf(token: string, expiresAt: Date | null, claimedLifetimeSeconds: number | null): CachedToken {
    const margin = this.auth.type === 'static' ? 0 : this.auth.refreshMarginSeconds * 1000;
    // A margin wider than the lifetime would refresh on every call; half the lifetime at most.
    const marginMs = claimedLifetimeSeconds === null ? margin : Math.min(margin, (claimedLifetimeSeconds * 1000) / 2);
    return { token, expiresAt: expiresAt?.getTime() ?? null, marginMs };
  }

  #isFresh(cached: CachedToken): boolean {
    return cached.expiresAt === null || this.#now() < cached.expiresAt - cached.marginMs;
  }

  #backoff(failures: number): number {
    const exponential = Math.min(this.#backoffMaxMs, this.#backoffBaseMs * 2 ** (failures - 1));
    return exponential / 2 + Math.random() * (exponential / 2);
  }

  #context(kind: 'access' | 'refresh'): string {
    return `crm-bridge/token/${this.connectionId}/${kind}`;
  }
}

type FormAnswer = { status: number; json: unknown } | { failure: string; retryAfterMs?: number | undefined };

/** Every error status comes back as a value: this caller classifies them itself. */
const ERROR_STATUSES = Array.from({ length: 200 }, (_, i) => 400 + i);

/**
 * One form POST through the shared CRM HTTP client, with auth off. The client may retry only
 * what the CRM provably did not act on (429 after its Retry-After, refused connections); a 5xx,
 * reset or timeout comes back here, because whether a refresh token may be sent again is this
 * caller's decision. Network failures come back as a value, not a throw.
 */
async function postTokenForm(client: CrmHttpClient, form: Record<string, string>, headers: Record<string, string>): Promise<FormAnswer> {
  try {
    const res = await client.request<string>({
      method: 'POST',
      url: client.baseUrl,
      form,
      headers,
      auth: false,
      idempotent: false,
      acceptStatus: ERROR_STATUSES,
      expect: 'text',
    });
    let json: unknown = null;
    try {
      json = JSON.parse(res.body);
    } catch {
      // An HTML error page where JSON was promised: classified by status alone.
    }
    return { status: res.status, json };
  } catch (err) {
    if (err instanceof CrmHttpError) {
      const { retryAfterMs } = err;
      return { failure: err.status === 429 ? `HTTP 429${retryAfterMs === undefined ? '' : ` (Retry-After ${Math.ceil(retryAfterMs / 1000)} s)`}` : err.message, retryAfterMs };
    }
    throw err;
  }
}

/** Lets one caller stop waiting without cancelling the refresh other callers share. */
function withSignal<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return promise;
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    if (signal.aborted) return onAbort();
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}
