// `npm run soak [-- --changes N --writes N --kills N --pg-restarts N --rate N]`: the reliability
// run of issue 8 against the sandbox with every lie on. Prints the table; exit 1 when a check fails.
import { parseArgs } from 'node:util';
import { DEFAULT_SOAK, formatTable, runSoak } from './soak.js';

const USAGE = 'usage: npm run soak [-- --changes N --writes N --kills N --pg-restarts N --rate N --seed N]';
let values: Partial<Record<'changes' | 'writes' | 'kills' | 'pg-restarts' | 'rate' | 'seed', string>> & { help?: boolean };
try {
  ({ values } = parseArgs({
    options: {
      changes: { type: 'string' },
      writes: { type: 'string' },
      kills: { type: 'string' },
      'pg-restarts': { type: 'string' },
      rate: { type: 'string' },
      seed: { type: 'string' },
      help: { type: 'boolean' },
    },
  }));
} catch (err) {
  // A wrong option is a message and exit 2, not a stack trace.
  process.stderr.write(`soak: ${(err as Error).message}\n${USAGE}\n`);
  process.exit(2);
}
if (values.help) {
  process.stdout.write(`${USAGE}\n`);
  process.exit(0);
}

function whole(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) {
    process.stderr.write(`soak: --${name} must be a whole number\n`);
    process.exit(2);
  }
  return n;
}

const stop = new AbortController();
process.once('SIGINT', () => stop.abort());
process.once('SIGTERM', () => stop.abort());

const options = {
  ...DEFAULT_SOAK,
  signal: stop.signal,
  databaseUrl: process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres',
  changes: whole('changes', values.changes, DEFAULT_SOAK.changes),
  writes: whole('writes', values.writes, DEFAULT_SOAK.writes),
  kills: whole('kills', values.kills, DEFAULT_SOAK.kills),
  pgRestarts: whole('pg-restarts', values['pg-restarts'], DEFAULT_SOAK.pgRestarts),
  rate: whole('rate', values.rate, DEFAULT_SOAK.rate) || DEFAULT_SOAK.rate,
  seed: whole('seed', values.seed, DEFAULT_SOAK.seed),
  log: (line: string) => process.stdout.write(`[soak ${new Date().toISOString().slice(11, 19)}] ${line}\n`),
};

const command = `npm run soak -- --changes ${options.changes} --writes ${options.writes} --kills ${options.kills} --pg-restarts ${options.pgRestarts} --rate ${options.rate}`;
try {
  const result = await runSoak(options);
  process.stdout.write(`\n${command}\n\n${formatTable(result)}\n`);
  process.exit(result.ok ? 0 : 1);
} catch (err) {
  process.stderr.write(`soak failed: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
}
