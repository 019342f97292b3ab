import { createHash, timingSafeEqual } from 'node:crypto';

export function sha256(value: string): Buffer {
  return createHash('sha256').update(value, 'utf8').digest();
}

/** Stands in for the secrets of an unknown connection, so that path does the same work. */
const UNKNOWN = [sha256('crm-bridge: no such connection')];

/**
 * Constant-time check of a presented secret against every accepted one. Comparing SHA-256
 * digests makes every comparison 32 bytes, so a secret of another length neither throws nor
 * answers faster, and every accepted secret is compared whether or not an earlier one matched.
 */
export function matchesAnySecret(presented: string | undefined, acceptedHashes: readonly Buffer[] | undefined): boolean {
  const candidate = sha256(presented ?? '');
  let matched = false;
  for (const hash of acceptedHashes ?? UNKNOWN) {
    matched = timingSafeEqual(candidate, hash) || matched;
  }
  return matched && presented !== undefined && acceptedHashes !== undefined;
}

/** The bearer credential of an Authorization header, or undefined. */
export function bearerToken(header: string | string[] | undefined): string | undefined {
  if (typeof header !== 'string') return undefined;
  const match = /^Bearer[ ]+(\S+)\s*$/i.exec(header);
  return match?.[1];
}
