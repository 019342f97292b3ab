// The sandbox CRM's public surface: start it in-process (tests, demo, bench) or as the
// `crm-bridge sandbox` command.
import type { AddressInfo } from 'node:net';
import { buildSandboxApp } from './app.js';
import type { OAuthClient } from './oauth-store.js';
import { SandboxState } from './state.js';
import type { SandboxSwitches } from './switches.js';

export type { AutomationLogEntry, AutomationRule, AutomationRuleInput } from './automation.js';
export type { RequestLogEntry } from './request-log.js';
export type { SandboxSwitches } from './switches.js';
export { SandboxState } from './state.js';

export interface SandboxOptions {
  /** 0 (the default) picks a free port. */
  port?: number;
  host?: string;
  seed?: number;
  /** Seeded records, split evenly between contacts and matters. */
  records?: number;
  /** Serve the control API under /_sandbox (default true). */
  control?: boolean;
  /** Shorthand for switches.autoApprove. */
  autoApprove?: boolean;
  /** OAuth clients; default one client `sandbox-client` / `sandbox-secret`. */
  clients?: Array<{ clientId: string; clientSecret: string; redirectUris?: string[] }>;
  switches?: Partial<SandboxSwitches>;
  logger?: boolean;
}

export interface Sandbox {
  /** http://127.0.0.1:PORT; the Clio API is at `${url}/api/v4`. */
  url: string;
  /** The "documented" host: the same API under a prefix, broken by the documentedHostBroken switch. */
  documentedUrl: string;
  port: number;
  state: SandboxState;
  close(): Promise<void>;
}

export const DEFAULT_CLIENT = { clientId: 'sandbox-client', clientSecret: 'sandbox-secret' } as const;
export const CONTROL_PREFIX = '/_sandbox';

export async function startSandbox(opts: SandboxOptions = {}): Promise<Sandbox> {
  const clients: OAuthClient[] = (opts.clients ?? [{ ...DEFAULT_CLIENT }]).map((c) => ({ ...c }));
  const state = new SandboxState({
    seed: opts.seed ?? 42,
    records: opts.records ?? 200,
    clients,
    switches: { ...opts.switches, ...(opts.autoApprove === undefined ? {} : { autoApprove: opts.autoApprove }) },
  });
  const app = await buildSandboxApp(state, { control: opts.control ?? true, logger: opts.logger ?? false });
  const host = opts.host ?? '127.0.0.1';
  await app.listen({ port: opts.port ?? 0, host });
  const port = (app.server.address() as AddressInfo).port;
  const shownHost = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host;
  state.url = `http://${shownHost}:${port}`;
  let closing: Promise<void> | null = null;
  return {
    url: state.url,
    documentedUrl: `${state.url}/documented`,
    port,
    state,
    close: () => {
      closing ??= (async () => {
        await app.close();
        await state.automationIdle();
      })();
      return closing;
    },
  };
}

export interface SandboxCommandOptions extends SandboxOptions {
  /** Where the banner goes; defaults to stdout. */
  print?: (line: string) => void;
  /** Stops the sandbox when aborted, in addition to SIGINT/SIGTERM. */
  signal?: AbortSignal;
}

const SHUTDOWN_TIMEOUT_MS = 5_000;

/**
 * `crm-bridge sandbox --port 4010 --seed 42 --records 500`: starts, prints where it listens and
 * how to authenticate, and resolves once a signal has shut it down.
 */
export async function runSandboxCommand(opts: SandboxCommandOptions = {}): Promise<void> {
  const print = opts.print ?? ((line: string) => process.stdout.write(`${line}\n`));
  const started = Date.now();
  const sandbox = await startSandbox({ port: 4010, ...opts });
  const client = opts.clients?.[0] ?? DEFAULT_CLIENT;
  const counts = sandbox.state.store;
  print(`sandbox CRM (Clio Manage v4 dialect) listening on ${sandbox.url}  [${Date.now() - started} ms]`);
  print(`  API:            ${sandbox.url}/api/v4  (${counts.matters.size} matters, ${counts.contacts.size} contacts, seed ${sandbox.state.seed})`);
  print(`  OAuth:          ${sandbox.url}/oauth/authorize, ${sandbox.url}/oauth/token`);
  print(`  client:         client_id=${client.clientId} client_secret=${client.clientSecret}`);
  print(`  documented:     ${sandbox.documentedUrl}  (broken when switch documentedHostBroken is on)`);
  print(`  control API:    ${opts.control === false ? 'disabled' : `${sandbox.url}${CONTROL_PREFIX}/`}`);

  await new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      opts.signal?.removeEventListener('abort', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
    if (opts.signal?.aborted) stop();
    else opts.signal?.addEventListener('abort', stop, { once: true });
  });
  print('sandbox CRM shutting down');
  const timeout = new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), SHUTDOWN_TIMEOUT_MS).unref());
  if ((await Promise.race([sandbox.close().then(() => 'closed' as const), timeout])) === 'timeout') {
    print(`sandbox CRM did not close within ${SHUTDOWN_TIMEOUT_MS} ms; exiting anyway`);
    process.exitCode = 1;
  }
}
