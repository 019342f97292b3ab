import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { availableParallelism, cpus, loadavg, release, totalmem } from 'node:os';
import postgres from 'postgres';

export interface Machine {
  lines: string[];
}

function git(args: string[]): string {
  try {
    return execFileSync('git', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return 'unknown';
  }
}

/** What the figures were measured on; the durability settings matter as much as the CPU. */
export async function describeMachine(postgresUrl: string): Promise<Machine> {
  const sql = postgres(postgresUrl, { max: 1, onnotice: () => {} });
  let pg: string;
  try {
    const [v] = await sql<{ version: string }[]>`select version()`;
    const [sc] = await sql<{ synchronous_commit: string }[]>`show synchronous_commit`;
    const [fs] = await sql<{ fsync: string }[]>`show fsync`;
    const [mc] = await sql<{ max_connections: string }[]>`show max_connections`;
    pg = `${v?.version.split(' on ')[0]} (synchronous_commit=${sc?.synchronous_commit}, fsync=${fs?.fsync}, max_connections=${mc?.max_connections}) at ${new URL(postgresUrl).host}`;
  } catch (err) {
    pg = `unreachable (${(err as Error).message})`;
  } finally {
    await sql.end({ timeout: 5 });
  }
  const dirty = git(['status', '--porcelain', '--untracked-files=no']) === '' ? '' : ' (with uncommitted changes)';
  return {
    lines: [
      `CPUs (nproc): ${availableParallelism()} × ${cpus()[0]?.model.trim() ?? 'unknown'}`,
      `Memory: ${(totalmem() / 1024 ** 3).toFixed(1)} GiB`,
      `Load average at start: ${loadavg().map((l) => l.toFixed(2)).join(' ')}`,
      `Node: ${process.version}; kernel ${release()}`,
      `Postgres: ${pg}`,
      `Commit: ${git(['rev-parse', '--short', 'HEAD'])}${dirty}`,
    ],
  };
}

let clockTicks: number | undefined;

/**
 * CPU seconds (user + system) a process on this machine has used so far, from /proc; undefined
 * without /proc, for a process that is gone, or when `command` is given and the process is not
 * that command (a remote database's backend pid is some other local process, or none).
 */
export function processCpuSeconds(pid: number, command?: string): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (command !== undefined && stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')) !== command) return undefined;
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    clockTicks ??= Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    return (Number(fields[11]) + Number(fields[12])) / clockTicks;
  } catch {
    return undefined;
  }
}

/** A process a run's CPU is read from: its pid, and its command where the pid may be another's (a Postgres backend). */
export interface Metered {
  pid: number;
  command?: string;
}

/** The Postgres backends serving a database's sessions other than this one's, when Postgres runs on this machine. */
export async function backendPids(databaseUrl: string): Promise<Metered[]> {
  const sql = postgres(databaseUrl, { max: 1, onnotice: () => {} });
  try {
    const rows = await sql<{ pid: number }[]>`select pid from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()`;
    return rows.map((r) => ({ pid: r.pid, command: 'postgres' })).filter((p) => processCpuSeconds(p.pid, p.command) !== undefined);
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/**
 * Runs `run` and says how many CPU seconds each named group of processes used meanwhile. The
 * groups are listed before and after the run, so a process that appears during it (a backend the
 * pool opened) counts from zero; a group none of whose processes /proc can read is left out.
 */
export async function cpuDuring<T, K extends string>(groups: () => Promise<Record<K, Metered[]>>, run: () => Promise<T>): Promise<{ result: T; seconds: Partial<Record<K, number>> }> {
  const read = (list: Metered[]) => {
    const used = new Map<number, number>();
    for (const { pid, command } of list) {
      const s = processCpuSeconds(pid, command);
      if (s !== undefined) used.set(pid, s);
    }
    return used;
  };
  const before = Object.entries(await groups()).map(([name, list]) => [name, read(list as Metered[])] as const);
  const result = await run();
  const after = await groups();
  const seconds: Partial<Record<K, number>> = {};
  for (const [name, start] of before) {
    const end = read(after[name as K]);
    if (end.size === 0) continue;
    let used = 0;
    for (const [pid, s] of end) used += s - (start.get(pid) ?? 0);
    seconds[name as K] = used;
  }
  return { result, seconds };
}

/**
 * CPU per item of each group, in µs, as "bridge 60 + Postgres 21 + sink 14 µs", and the most
 * items per second the machine's cores could do at that cost with every core busy.
 */
export function costPerItem(seconds: Record<string, number | undefined>, items: number): { text: string; bound: number } {
  const parts = Object.entries(seconds).filter((e): e is [string, number] => e[1] !== undefined);
  const us = parts.map(([name, s]) => [name, (s * 1e6) / Math.max(1, items)] as const);
  const total = us.reduce((sum, [, v]) => sum + v, 0);
  return {
    text: `${us.map(([name, v]) => `${name} ${Math.round(v)}`).join(' + ')} µs`,
    bound: total > 0 ? (availableParallelism() * 1e6) / total : Infinity,
  };
}
