// Child processes for the sync benchmarks (backfill, re-poll, delivery, latency, rate limit):
// each side of a measurement runs in its own process, so neither shares an event loop with the
// other or with the bench runner, and a process's peak RSS is its own. One protocol for all of
// them: the child says `ready` (with a URL when it serves), then answers each request with one
// message, and exits on `stop`, when the parent goes away, or after a hard lifetime.
import { execFile, fork, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, realpathSync, rmSync, symlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import postgres from 'postgres';

export type Reply = { type: 'ready'; url?: string } | { type: 'result'; [key: string]: unknown } | { type: 'failed'; message: string };
export type Request = { type: string; [key: string]: unknown };

export interface Child {
  url: string | undefined;
  /** Its process id (for reading the CPU it uses, see cpuDuring). */
  pid: number;
  /** Sends a request and waits for its one answer; a `failed` answer or an exit rejects. */
  ask<T = Record<string, unknown>>(request: Request, timeoutMs?: number): Promise<T>;
  stop(): Promise<void>;
}

const ROOT = fileURLToPath(new URL('..', import.meta.url));
let compiled: Promise<string> | undefined;

/** The image's NODE_OPTIONS (the Dockerfile's heap cap): the compiled app runs with them, as in the image. */
export function imageNodeOptions(): string {
  return /NODE_OPTIONS=(\S+)/.exec(readFileSync(join(ROOT, 'Dockerfile'), 'utf8'))?.[1] ?? '';
}

/**
 * The app and bench/sync-child.ts compiled by tsc (tsconfig.bench.json), once per bench run. The
 * Docker image runs the app compiled (`node dist/cli.js`), and a process under tsx also holds
 * tsx's loader thread and compiled sources, about 80 MB more before the app does anything.
 */
export function compileBench(): Promise<string> {
  compiled ??= (async () => {
    const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
    await promisify(execFile)(process.execPath, [tsc, '-p', 'tsconfig.bench.json'], { cwd: ROOT });
    const out = join(ROOT, 'node_modules/.cache/crm-bridge-bench');
    // The compiled src/db/client.js applies migrations from ../../drizzle, as dist/db/client.js does.
    // A link left by a run from another checkout (node_modules shared) points elsewhere, or nowhere.
    const link = join(out, 'drizzle');
    if (!existsSync(link) || realpathSync(link) !== realpathSync(join(ROOT, 'drizzle'))) {
      rmSync(link, { force: true });
      symlinkSync(join(ROOT, 'drizzle'), link);
    }
    return out;
  })();
  return compiled;
}

/**
 * Forks `script` with stdout at /dev/null (the app logs there, as in production): through tsx,
 * or with `built`, compiled (see compileBench) and run by plain node.
 */
export async function startChild(script: string, args: string[], env: Record<string, string> = {}, options: { built?: boolean } = {}): Promise<Child> {
  const path = options.built ? join(await compileBench(), relative(ROOT, script)).replace(/\.ts$/, '.js') : script;
  const devNull = openSync('/dev/null', 'w');
  const child: ChildProcess = fork(path, args, {
    // BENCH_CPU_PROF=dir writes a CPU profile of every child there (for finding where time goes).
    execArgv: [...(options.built ? [] : ['--import', 'tsx']), ...(process.env.BENCH_CPU_PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF}`] : [])],
    env: { ...process.env, ...(options.built ? { NODE_OPTIONS: imageNodeOptions() } : {}), ...env },
    stdio: ['ignore', devNull, 'inherit', 'ipc'],
  });
  closeSync(devNull);
  const name = `${script.split('/').at(-1)} ${args.join(' ')}`;
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const next = (timeoutMs: number) =>
    new Promise<Reply>((resolve, reject) => {
      const onMessage = (m: Reply) => {
        cleanup();
        resolve(m);
      };
      const onExit = (code: number | null) => {
        cleanup();
        reject(new Error(`${name}: exited with code ${code}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`${name}: no answer in ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        child.off('message', onMessage);
        child.off('exit', onExit);
      };
      child.on('message', onMessage);
      child.on('exit', onExit);
    });
  const first = await next(120_000).catch((err: unknown) => {
    child.kill('SIGKILL');
    throw err;
  });
  if (first.type !== 'ready') {
    child.kill('SIGKILL');
    throw new Error(`${name}: ${JSON.stringify(first)}`);
  }
  return {
    url: first.url,
    pid: child.pid!,
    ask: async <T>(request: Request, timeoutMs = 300_000) => {
      const answer = next(timeoutMs);
      child.send(request);
      const reply = await answer;
      if (reply.type === 'failed') throw new Error(`${name} ${request.type}: ${reply.message}`);
      return reply as T;
    },
    stop: async () => {
      if (child.exitCode === null && child.connected) child.send({ type: 'stop' } satisfies Request);
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** The child side: answers requests with `handle`, exits on stop/disconnect/lifetime. */
export function serveParent(handle: (request: Request) => Promise<Record<string, unknown>>, options: { url?: string; close?: () => Promise<void>; maxLifetimeMs?: number } = {}): void {
  let stopping = false;
  const stop = async (code: number) => {
    if (!stopping) {
      stopping = true;
      await Promise.race([options.close?.(), new Promise((resolve) => setTimeout(resolve, 10_000).unref())]);
    }
    process.exit(code);
  };
  process.on('message', (request: Request) => {
    if (request.type === 'stop') return void stop(0);
    handle(request).then(
      (result) => process.send?.({ ...result, type: 'result' }),
      (err: unknown) => process.send?.({ type: 'failed', message: err instanceof Error ? `${err.message}\n${err.stack}` : String(err) }),
    );
  });
  process.on('disconnect', () => void stop(1));
  process.on('SIGTERM', () => void stop(0));
  // Hard stop, so a stuck child can never outlive a bench run.
  setTimeout(() => void stop(1), options.maxLifetimeMs ?? 10 * 60_000).unref();
  process.send?.({ type: 'ready', ...(options.url === undefined ? {} : { url: options.url }) } satisfies Reply);
}

/** A throwaway database on the Postgres server, dropped by `drop`. */
export async function createBenchDatabase(serverUrl: string): Promise<{ url: string; drop: () => Promise<void> }> {
  const name = `crm_bridge_bench_${randomBytes(6).toString('hex')}`;
  const admin = postgres(serverUrl, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(`create database ${name}`);
  } finally {
    await admin.end();
  }
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    drop: async () => {
      const cleanup = postgres(serverUrl, { max: 1, onnotice: () => {} });
      await cleanup.unsafe(`drop database if exists ${name} with (force)`).finally(() => cleanup.end());
    },
  };
}

export const fmt = (n: number, digits = 0) => n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });

/** A percentile of sorted numbers (nearest rank). */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
}
