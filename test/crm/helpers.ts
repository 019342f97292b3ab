import type { Sandbox } from '../../src/sandbox/index.js';
import type { CrmHttpLog } from '../../src/crm/http-client.js';
import type { TokenProvider } from '../../src/crm/token-provider.js';

/**
 * A client_credentials TokenProvider against the sandbox's token endpoint: small enough to read
 * in one go, for HTTP client tests that are about the client, not the token manager.
 */
export function sandboxTokens(sb: Sandbox): TokenProvider & { issued: string[]; unauthorizedCalls: number } {
  let current: Promise<string> | undefined;
  const issued: string[] = [];
  const fetchToken = async (): Promise<string> => {
    const res = await fetch(`${sb.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: 'grant_type=client_credentials&client_id=sandbox-client&client_secret=sandbox-secret',
    });
    const body = (await res.json()) as { access_token: string };
    issued.push(body.access_token);
    return body.access_token;
  };
  const provider = {
    issued,
    unauthorizedCalls: 0,
    getAccessToken: () => (current ??= fetchToken()),
    async handleUnauthorized(rejected: string) {
      provider.unauthorizedCalls++;
      if ((await current) === rejected) current = fetchToken();
      return current ?? fetchToken();
    },
  };
  return provider;
}

/** Collects the client's log lines, so tests can read what it waited and prove no token leaks. */
export function captureLog(): CrmHttpLog & { lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }>; text(): string } {
  const lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }> = [];
  return {
    lines,
    debug: (obj, msg) => lines.push({ level: 'debug', obj: obj as Record<string, unknown>, msg }),
    warn: (obj, msg) => lines.push({ level: 'warn', obj: obj as Record<string, unknown>, msg }),
    text: () => JSON.stringify(lines),
  };
}
