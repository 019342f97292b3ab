import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/**
 * The demo connection's hook secret: generated once and kept in DATA_DIR, so it survives
 * restarts and a pasted curl keeps working.
 */
export function demoHookSecret(dataDir: string): string {
  const file = join(dataDir, 'demo-hook-secret');
  try {
    return readFileSync(file, 'utf8').trim();
  } catch {
    const secret = randomBytes(24).toString('base64url');
    mkdirSync(dataDir, { recursive: true });
    writeFileSync(file, `${secret}\n`, { mode: 0o600 });
    return secret;
  }
}
