import { join } from 'node:path';
import { inject } from 'vitest';

/** Node's arguments for `crm-bridge <args>`: the CLI the global setup compiled, run by plain node as the image runs it. */
export function crmBridge(...args: string[]): string[] {
  return [compiled('src/cli.ts'), ...args];
}

/** Where the global setup compiled a file of src/ or test/fixtures/ (`test/fixtures/token-worker.ts`), to run with plain node. */
export function compiled(path: string): string {
  return join(inject('compiledRoot'), path.replace(/\.ts$/, '.js'));
}
