import { randomBytes } from 'node:crypto';
import { createServer, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { loadConfig } from '../config/load.js';
import { openDatabase } from '../db/client.js';
import { AppError } from '../errors.js';
import { loadTokenKey, TokenCipher } from './crypto.js';
import { createTokenManager } from './token-manager.js';

export interface AuthCommandOptions {
  connection: string;
  /** Local port for the callback listener; default: the redirect URI's, else any free port. */
  port?: number | undefined;
  redirectUri?: string | undefined;
  /** false: print the URL and read the redirected URL (or the bare code) from `input`. */
  listen: boolean;
  timeoutSeconds: number;
  print?: (line: string) => void;
  input?: NodeJS.ReadableStream;
  env?: Record<string, string | undefined>;
}

const LOCAL_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]']);

/**
 * `crm-bridge auth <connection>`: the authorization-code bootstrap from a terminal. Prints the
 * CRM's consent URL, then takes the code from whichever comes first: the browser landing on a
 * local listener, or the redirected URL (or code) pasted on stdin, for a machine whose browser
 * cannot reach this one.
 */
export async function runAuthCommand(opts: AuthCommandOptions): Promise<void> {
  const print = opts.print ?? ((line: string) => process.stdout.write(`${line}\n`));
  const config = loadConfig(opts.env);
  const connection = config.connections.find((c) => c.id === opts.connection);
  // Operator mistakes: one line and exit status 2, as every other command answers them.
  if (!connection) {
    throw new AppError(404, 'UNKNOWN_CONNECTION', `no connection "${opts.connection}" in ${config.source ?? 'the configuration'} (known: ${config.connections.map((c) => c.id).join(', ')})`);
  }
  if (connection.auth.type !== 'oauth2') {
    throw new AppError(422, 'NOT_OAUTH2', `connection "${connection.id}" uses auth type ${connection.auth.type}; only oauth2 (authorization code) is authorised this way`);
  }

  const redirectUri = opts.redirectUri ?? connection.auth.redirectUri;
  const target = redirectUri === undefined ? undefined : new URL(redirectUri);
  const canListen = opts.listen && (target === undefined || (target.protocol === 'http:' && LOCAL_HOSTS.has(target.hostname)));
  if (opts.listen && !canListen) print(`The redirect URI ${redirectUri} is not on this machine: paste the URL the CRM redirects to instead.`);

  const database = openDatabase({ url: config.env.DATABASE_URL, dataDir: join(config.env.DATA_DIR, 'pgdata') });
  let server: Server | undefined;
  const stop = new AbortController();
  try {
    await database.migrate();
    const cipher = new TokenCipher(loadTokenKey({ key: config.env.TOKEN_ENCRYPTION_KEY, driver: database.driver, dataDir: config.env.DATA_DIR }));
    const manager = createTokenManager(database.db, connection, { cipher });
    const state = randomBytes(16).toString('base64url');

    let resolveCode!: (code: string) => void;
    let rejectCode!: (err: Error) => void;
    const code = new Promise<string>((resolve, reject) => {
      resolveCode = resolve;
      rejectCode = reject;
    });
    /** The code from a redirected URL, checking the state we sent; a bare string is taken as the code. */
    const fromRedirect = (value: string): string | Error | null => {
      if (!/^https?:\/\//.test(value) && !value.startsWith('/')) return value === '' ? null : value;
      const params = new URL(value, 'http://localhost').searchParams;
      if (params.get('state') !== state) return new Error('the state in that URL is not the one this command sent; start again');
      if (params.get('error')) return new Error(`the CRM refused: ${params.get('error')}${params.get('error_description') ? `: ${params.get('error_description')}` : ''}`);
      return params.get('code') ?? new Error('that URL carries no code');
    };

    let pendingResponse: ServerResponse | undefined;
    let callbackUri = redirectUri;
    if (canListen) {
      const path = target?.pathname ?? `/oauth/${connection.id}/callback`;
      let answered = false;
      server = createServer((req, res) => {
        const url = new URL(req.url ?? '/', 'http://localhost');
        if (url.pathname !== path || answered) return void res.writeHead(404).end();
        const got = fromRedirect(url.toString());
        if (got === null || got instanceof Error) {
          res.writeHead(400, { 'content-type': 'text/plain; charset=utf-8' }).end(`crm-bridge: ${got?.message ?? 'no code'}\n`);
          if (got instanceof Error && url.searchParams.get('state') === state) rejectCode(got);
          return;
        }
        answered = true;
        // Answered once the exchange is done, so the browser shows whether it worked.
        pendingResponse = res;
        resolveCode(got);
      });
      await new Promise<void>((resolve, reject) => {
        server!.once('error', reject);
        server!.listen(opts.port ?? (target?.port ? Number(target.port) : 0), target?.hostname.replace(/^\[|\]$/g, '') ?? '127.0.0.1', resolve);
      });
      const port = (server.address() as AddressInfo).port;
      callbackUri ??= `http://127.0.0.1:${port}${path}`;
    }
    if (callbackUri === undefined) throw new Error('no redirect URI: set auth.redirectUri, pass --redirect-uri, or let the command listen');

    print(`Open this URL in a browser and approve access for "${connection.id}":`);
    print('');
    print(`  ${manager.authorizationUrl({ state, redirectUri: callbackUri })}`);
    print('');
    print(canListen ? `Waiting for the CRM to redirect to ${callbackUri} (or paste the URL it redirected to here)...` : 'Then paste the URL the CRM redirected to (or just the code) here:');

    const input = opts.input ?? process.stdin;
    const lines = createInterface({ input, terminal: false });
    stop.signal.addEventListener('abort', () => lines.close(), { once: true });
    lines.on('line', (line) => {
      const got = fromRedirect(line.trim());
      if (got instanceof Error) rejectCode(got);
      else if (got !== null) resolveCode(got);
    });
    if (!canListen) lines.once('close', () => rejectCode(new Error('input ended before a code was pasted')));

    const timer = setTimeout(() => rejectCode(new Error(`no authorization within ${opts.timeoutSeconds} s; start again`)), opts.timeoutSeconds * 1000);
    stop.signal.addEventListener('abort', () => clearTimeout(timer), { once: true });
    let granted: Awaited<ReturnType<typeof manager.exchangeCode>>;
    try {
      granted = await manager.exchangeCode(await code, callbackUri);
    } catch (err) {
      pendingResponse?.writeHead(502, { 'content-type': 'text/plain; charset=utf-8' }).end(`crm-bridge: ${(err as Error).message}\n`);
      throw err;
    }
    pendingResponse?.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end('<!doctype html><h1>Connected</h1><p>crm-bridge stored the tokens. You can close this window.</p>');
    print(`Connection "${connection.id}" is authorised; its tokens are stored encrypted.`);
    print(
      `  the CRM claimed an access-token lifetime of ${granted.claimedLifetimeSeconds === null ? 'nothing (no expires_in)' : `${granted.claimedLifetimeSeconds} s`}` +
        (granted.hasRefreshToken ? '; a refresh token was granted' : '; no refresh token was granted, so this must be repeated when the access token dies'),
    );
  } finally {
    stop.abort();
    if (server) {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server!.close(() => resolve()));
    }
    await database.close();
  }
}
