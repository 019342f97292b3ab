import type { AuthConfig } from '../config/schema.js';
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

/**
 * What an operator does about a connection that needs re-authorisation, by its auth type: the
 * one place that decides it, for the log line, `crm-bridge status`, the CLI summaries and the
 * status page. Only an authorization-code grant can be renewed through `crm-bridge auth` (it
 * refuses the other types); a static token or client credentials are fixed in the configuration.
 * Commands, paths and settings are in backticks (the status page shows them as code).
 */
export function reauthHint(connectionId: string, authType: AuthConfig['type']): string {
  switch (authType) {
    case 'oauth2':
      return `run \`crm-bridge auth ${connectionId}\` or open \`/oauth/${connectionId}/start\` (admin login)`;
    case 'static':
      return `replace the token (\`auth.token\`) of connection ${connectionId} in the configuration, then restart crm-bridge`;
    case 'client_credentials':
      return `check the client id and secret (\`auth.clientId\`, \`auth.clientSecret\`) of connection ${connectionId} in the configuration and that the CRM still accepts them, then restart crm-bridge`;
    case 'none':
      return `connection ${connectionId} sends no credential (\`auth.type: none\`) but the CRM asks for one: configure its \`auth\`, then restart crm-bridge`;
  }
}
