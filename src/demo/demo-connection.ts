import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/**
 * Without a connections file, crm-bridge runs one connection named `demo` so a fresh machine
 * has something to POST to. Its hook secret is generated once and kept in DATA_DIR, so it
 * survives restarts and a pasted curl keeps working.
 */
export function demoConnections(dataDir: string): { connections: unknown[]; secret: string } {
  const file = join(dataDir, 'demo-hook-secret');
  let secret: string;
  try {
    secret = readFileSync(file, 'utf8').trim();
  } catch {
    secret = randomBytes(24).toString('base64url');
    mkdirSync(dataDir, { recursive: true });
    writeFileSync(file, `${secret}\n`, { mode: 0o600 });
  }
  return {
    secret,
    connections: [
      {
        id: 'demo',
        connector: {
          objects: {
            matters: { idPath: 'id', updatedAtPath: 'updated_at', volatile: ['etag'] },
            contacts: { idPath: 'id', updatedAtPath: 'updated_at', volatile: ['etag'] },
          },
        },
        inbound: { secrets: [secret], object: 'matters' },
      },
    ],
  };
}
