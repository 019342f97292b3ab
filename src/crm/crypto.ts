import { createCipheriv, createDecipheriv, createHmac, hkdfSync, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError } from '../config/load.js';

/**
 * Tokens at rest: AES-256-GCM with a random 96-bit IV per value. The additional data binds a
 * ciphertext to its connection and column, so a row copied into another connection (or an
 * access token pasted over a refresh token) fails to decrypt instead of being used.
 */
const VERSION = 'v1';
const KEY_FILE = 'token-encryption.key';

export class TokenCipher {
  readonly #key: Buffer;
  readonly #stateKey: Buffer;

  constructor(key: Buffer) {
    if (key.length !== 32) throw new Error('the token encryption key must be 32 bytes');
    this.#key = key;
    // A separate key for signing OAuth `state`, so the same bytes never serve two algorithms.
    this.#stateKey = Buffer.from(hkdfSync('sha256', key, Buffer.alloc(0), 'crm-bridge oauth state', 32));
  }

  encrypt(plaintext: string, context: string): string {
    const iv = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', this.#key, iv);
    cipher.setAAD(Buffer.from(context, 'utf8'));
    const body = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final()]);
    return [VERSION, iv.toString('base64url'), cipher.getAuthTag().toString('base64url'), body.toString('base64url')].join('.');
  }

  decrypt(sealed: string, context: string): string {
    const [version, iv, tag, body] = sealed.split('.');
    if (version !== VERSION || iv === undefined || tag === undefined || body === undefined) {
      throw new Error('stored token is not in the expected encrypted format');
    }
    const decipher = createDecipheriv('aes-256-gcm', this.#key, Buffer.from(iv, 'base64url'));
    decipher.setAAD(Buffer.from(context, 'utf8'));
    decipher.setAuthTag(Buffer.from(tag, 'base64url'));
    try {
      return Buffer.concat([decipher.update(Buffer.from(body, 'base64url')), decipher.final()]).toString('utf8');
    } catch {
      // The usual cause is a different TOKEN_ENCRYPTION_KEY than the one that wrote the row.
      throw new Error('stored token cannot be decrypted: TOKEN_ENCRYPTION_KEY differs from the key that stored it');
    }
  }

  /** `payload.signature`, base64url: for values that travel through a browser and must come back unaltered. */
  sign(payload: string): string {
    return `${Buffer.from(payload, 'utf8').toString('base64url')}.${this.#mac(payload)}`;
  }

  /** The payload if the signature holds, otherwise null. */
  verify(signed: string): string | null {
    const dot = signed.indexOf('.');
    if (dot <= 0) return null;
    const payload = Buffer.from(signed.slice(0, dot), 'base64url').toString('utf8');
    const expected = Buffer.from(this.#mac(payload), 'utf8');
    const given = Buffer.from(signed.slice(dot + 1), 'utf8');
    return expected.length === given.length && timingSafeEqual(expected, given) ? payload : null;
  }

  #mac(payload: string): string {
    return createHmac('sha256', this.#stateKey).update(payload, 'utf8').digest('base64url');
  }
}

export interface TokenKeySource {
  /** TOKEN_ENCRYPTION_KEY, base64 (validated to 32 bytes by the env schema). */
  key: string | undefined;
  driver: 'pglite' | 'postgres';
  dataDir: string;
}

/**
 * The key from TOKEN_ENCRYPTION_KEY; or, on the embedded database only, one generated once and
 * kept beside the data (`DATA_DIR/token-encryption.key`, mode 0600). Postgres has no such
 * default: every replica must decrypt what another stored, so they must be given one key.
 */
export function loadTokenKey(source: TokenKeySource): Buffer {
  if (source.key !== undefined) return Buffer.from(source.key, 'base64');
  if (source.driver === 'postgres') {
    throw new ConfigError([
      'environment variable TOKEN_ENCRYPTION_KEY: required with DATABASE_URL (replicas must share one key to read each other\'s tokens); create one with: openssl rand -base64 32',
    ]);
  }
  // An in-memory database forgets its tokens on exit, so its key need not outlive the process.
  if (source.dataDir.startsWith('memory://')) return randomBytes(32);
  mkdirSync(source.dataDir, { recursive: true });
  const path = join(source.dataDir, KEY_FILE);
  try {
    writeFileSync(path, `${randomBytes(32).toString('base64')}\n`, { mode: 0o600, flag: 'wx' });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  const key = Buffer.from(readFileSync(path, 'utf8').trim(), 'base64');
  if (key.length !== 32) throw new ConfigError([`${path}: not a 32-byte base64 key; restore it, or delete it and re-authorise every connection`]);
  return key;
}
