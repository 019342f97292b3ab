import { AppError } from '../errors.js';

/**
 * What the CRM HTTP client needs from authentication. The OAuth2 token manager implements it
 * (refresh_token, client_credentials and static-token modes); the client never sees grants.
 */
export interface TokenProvider {
  /** A usable access token, refreshed first when it is within the margin of its expiry. */
  getAccessToken(signal?: AbortSignal): Promise<string>;
  /**
   * The CRM answered 401 to `rejected`. Refresh once (unless another caller already replaced
   * that token) and return the token to replay with. Throws NeedsReauthError when the grant is
   * gone, or in static-token mode.
   */
  handleUnauthorized(rejected: string, signal?: AbortSignal): Promise<string>;
}

/** The connection's grant is revoked or invalid: an operator must re-authorise it. */
export class NeedsReauthError extends AppError {
  constructor(
    readonly connectionId: string,
    reason: string,
  ) {
    super(503, 'NEEDS_REAUTH', `Connection ${connectionId} needs re-authorisation: ${reason}`);
    this.name = 'NeedsReauthError';
  }
}
