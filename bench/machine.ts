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
