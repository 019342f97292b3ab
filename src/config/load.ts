import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import type { z } from 'zod';
import { presets } from '../crm/presets/index.js';
import { connectionsFileSchema, envSchema, type ConnectionConfig, type Env } from './schema.js';

export interface Config {
  env: Env;
  connections: ConnectionConfig[];
  /** Where the connections came from: a file path, or undefined for the built-in demo. */
  source: string | undefined;
}

/** Bad configuration: every problem found, each naming the value and where it is. */
export class ConfigError extends Error {
  readonly code = 'CONFIG_INVALID';
  constructor(readonly problems: string[]) {
    super(`crm-bridge cannot start: the configuration is invalid\n${problems.map((p) => `  - ${p}`).join('\n')}`);
    this.name = 'ConfigError';
  }
}

type Source = Record<string, string | undefined>;

/** The only reader of `process.env` (callers pass it in). */
export function loadEnv(source: Source = process.env): Env {
  const picked = Object.fromEntries(
    Object.keys(envSchema.shape).map((k) => [k, source[k] === '' ? undefined : source[k]]),
  );
  const result = envSchema.safeParse(picked);
  if (!result.success) throw new ConfigError(formatIssues(result.error.issues, 'environment variable '));
  return result.data;
}

/**
 * Reads env and the connections file (YAML or JSON), resolves `${VAR}` references and presets,
 * and validates all of it, reporting every bad value in one error.
 */
export function loadConfig(
  source: Source = process.env,
  defaults?: { connections: unknown[] } | ((env: Env) => { connections: unknown[] }),
): Config {
  const problems: string[] = [];
  let env: Env | undefined;
  try {
    env = loadEnv(source);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    problems.push(...err.problems);
  }

  const file = source.CRM_BRIDGE_CONFIG || undefined;
  let raw: unknown = typeof defaults === 'function' ? (env && file === undefined ? defaults(env) : undefined) : defaults;
  if (file !== undefined) {
    const path = resolve(file);
    try {
      raw = parseYaml(readFileSync(path, 'utf8'), { prettyErrors: true });
    } catch (err) {
      const reason = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'file not found' : (err as Error).message.split('\n')[0];
      problems.push(`CRM_BRIDGE_CONFIG ${path}: ${reason}`);
      raw = undefined;
    }
  }

  let connections: ConnectionConfig[] = [];
  if (raw !== undefined) {
    const where = file ?? 'built-in demo config';
    const unset = new Set<string>();
    const interpolated = interpolate(raw, [], source, problems, where, unset);
    const withPresets = resolvePresets(interpolated, problems, where);
    const result = connectionsFileSchema.safeParse(withPresets);
    if (result.success) connections = result.data.connections;
    else {
      // A value left unset is reported once, as unset, not again for its shape.
      const issues = result.error.issues.filter((issue) => !unset.has(formatPath(issue.path)));
      problems.push(...formatIssues(issues, `${where}: `));
    }
  } else if (file === undefined && env !== undefined) {
    problems.push('no connections: set CRM_BRIDGE_CONFIG to a connections file');
  }

  if (problems.length > 0 || env === undefined) throw new ConfigError(problems);
  return { env, connections, source: file };
}

function formatIssues(issues: z.core.$ZodIssue[], prefix: string): string[] {
  return issues.map((issue) => `${prefix}${formatPath(issue.path) || '(root)'}: ${issue.message}`);
}

function formatPath(path: PropertyKey[]): string {
  return path.reduce<string>((acc, key) => (typeof key === 'number' ? `${acc}[${key}]` : acc ? `${acc}.${String(key)}` : String(key)), '');
}

const REFERENCE = /\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g;

/** Replaces `${VAR}` in every string, recording each missing variable with its path. */
function interpolate(value: unknown, path: PropertyKey[], source: Source, problems: string[], where: string, unset: Set<string>): unknown {
  if (typeof value === 'string') {
    return value.replace(REFERENCE, (reference, name: string) => {
      const found = source[name];
      if (found === undefined || found === '') {
        problems.push(`${where}: ${formatPath(path)}: environment variable ${name} is not set`);
        unset.add(formatPath(path));
        return reference;
      }
      return found;
    });
  }
  if (Array.isArray(value)) return value.map((v, i) => interpolate(v, [...path, i], source, problems, where, unset));
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(
      Object.entries(value).map(([k, v]) => [k, interpolate(v, [...path, k], source, problems, where, unset)]),
    );
  }
  return value;
}

/** `connector: clio` → the preset's definition, so presets and inline definitions validate alike. */
function resolvePresets(file: unknown, problems: string[], where: string): unknown {
  if (file === null || typeof file !== 'object' || !Array.isArray((file as { connections?: unknown }).connections)) return file;
  const connections = (file as { connections: unknown[] }).connections.map((c, i) => {
    if (c === null || typeof c !== 'object') return c;
    const connector = (c as { connector?: unknown }).connector;
    if (typeof connector !== 'string') return c;
    // Own keys only: `constructor` or `toString` would find Object's own functions.
    const preset = Object.hasOwn(presets, connector) ? presets[connector] : undefined;
    if (preset === undefined) {
      const known = Object.keys(presets);
      problems.push(`${where}: connections[${i}].connector: unknown preset "${connector}"${known.length ? ` (known: ${known.join(', ')})` : ''}`);
      return c;
    }
    return { ...c, connector: structuredClone(preset) };
  });
  return { ...file, connections };
}
