import { inject } from 'vitest';

/** Node's arguments for `crm-bridge <args>`: the CLI the global setup compiled, run by plain node as the image runs it. */
export function crmBridge(...args: string[]): string[] {
  return [inject('compiledCli'), ...args];
}
