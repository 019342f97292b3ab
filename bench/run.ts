// `npm run bench`: runs every registered case, prints a table of figures with targets, and
// writes the results, the machine and the command into BENCHMARKS.md. Exits 1 when a figure
// misses its target or a case fails, so a regression cannot pass quietly.
// Options: --seconds N (measured seconds per load run, default 10), --only id[,id],
// --log-level L (the app's LOG_LEVEL under load, default info).
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { BenchCase, Figure } from './cases.js';
import { describeMachine } from './machine.js';
import { benchCases } from './registry.js';

const DEFAULT_POSTGRES = 'postgres://postgres@127.0.0.1:5432/postgres';
const BENCHMARKS_MD = fileURLToPath(new URL('../BENCHMARKS.md', import.meta.url));
const START = '<!-- bench:results:start (written by npm run bench; edit outside these markers) -->';
const END = '<!-- bench:results:end -->';

const USAGE = `usage: npm run bench [-- --only ${benchCases.map((c) => c.id).join(',')}] [--seconds N] [--log-level L]`;

/** A wrong option is a message and exit 2, never a stack trace or a whole run nobody asked for. */
function usage(problem?: string): never {
  (problem ? process.stderr : process.stdout).write(`${problem ? `bench: ${problem}\n` : ''}${USAGE}\n`);
  process.exit(problem ? 2 : 0);
}

let values: { seconds?: string; only?: string; 'log-level'?: string; help?: boolean };
try {
  ({ values } = parseArgs({ options: { seconds: { type: 'string' }, only: { type: 'string' }, 'log-level': { type: 'string' }, help: { type: 'boolean' } } }));
} catch (err) {
  usage((err as Error).message);
}
if (values.help) usage();
const seconds = Number(values.seconds ?? 10);
if (!Number.isFinite(seconds) || seconds <= 0) usage(`--seconds must be a positive number (got ${values.seconds})`);
const only = values.only?.split(',');
const logLevel = values['log-level'] ?? 'info';
const unknown = only?.filter((id) => !benchCases.some((c) => c.id === id)) ?? [];
if (unknown.length > 0) usage(`--only: unknown case(s) ${unknown.join(', ')}`);
// A bench script, not the service: it may read the environment for where Postgres is.
const postgresUrl = process.env.DATABASE_URL || DEFAULT_POSTGRES;
const command = ['npm run bench', ...(process.argv.length > 2 ? ['--', ...process.argv.slice(2)] : [])].join(' ');

interface Row extends Figure {
  caseId: string;
}

const rows: Row[] = [];
const details: { title: string; lines: string[] }[] = [];
const machine = await describeMachine(postgresUrl);
const startedAt = new Date();
for (const line of machine.lines) console.log(line);

for (const c of benchCases) {
  if (only && !only.includes(c.id)) continue;
  if (!c.run) {
    for (const target of c.targets) rows.push({ caseId: c.id, name: c.title, value: 'not yet measured', target, pass: undefined });
    continue;
  }
  console.log(`\n${c.title} …`);
  const began = performance.now();
  try {
    const result = await c.run({ postgresUrl, seconds, logLevel, log: (line) => console.log(line) });
    rows.push(...result.figures.map((f) => ({ ...f, caseId: c.id })));
    details.push({ title: `${c.title} (${((performance.now() - began) / 1000).toFixed(0)} s)`, lines: result.details });
  } catch (err) {
    console.error(err);
    rows.push({ caseId: c.id, name: c.title, value: `failed: ${(err as Error).message}`, target: c.targets.join(', '), pass: false });
  }
}

const verdict = (pass: boolean | undefined) => (pass === undefined ? '' : pass ? 'pass' : 'FAIL');
const table = [['figure', 'value', 'target', ''], ...rows.map((r) => [r.name, r.value, r.target, verdict(r.pass)])];
const widths = table[0]!.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
console.log(`\n${table.map((row) => row.map((cell, i) => cell.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n')}`);

writeBenchmarksMd(renderResults());
const failed = rows.filter((r) => r.pass === false).length;
console.log(`\n${failed === 0 ? 'all measured figures meet their targets' : `${failed} figure(s) miss their target`}; results written to BENCHMARKS.md`);
process.exitCode = failed === 0 ? 0 : 1;

function renderResults(): string {
  const cell = (s: string) => s.replaceAll('|', '\\|');
  return [
    START,
    `## Latest results`,
    '',
    `Measured ${startedAt.toISOString()} with \`${command}\`${postgresUrl === DEFAULT_POSTGRES ? '' : ' (DATABASE_URL set)'}.`,
    '',
    '| figure | value | target | |',
    '|---|---|---|---|',
    ...rows.map((r) => `| ${cell(r.name)} | ${cell(r.value)} | ${cell(r.target)} | ${verdict(r.pass)} |`),
    '',
    '### Machine',
    '',
    ...machine.lines.map((l) => `- ${l}`),
    '',
    ...details.flatMap((d) => [`### ${d.title}`, '', ...d.lines.map((l) => `- ${l}`), '']),
    END,
  ].join('\n');
}

/** Replaces the results between the markers and keeps everything else (the hand-written notes). */
function writeBenchmarksMd(results: string): void {
  if (existsSync(BENCHMARKS_MD)) {
    const text = readFileSync(BENCHMARKS_MD, 'utf8');
    const a = text.indexOf(START);
    const b = text.indexOf(END);
    if (a >= 0 && b > a) {
      writeFileSync(BENCHMARKS_MD, text.slice(0, a) + results + text.slice(b + END.length));
      return;
    }
    writeFileSync(BENCHMARKS_MD, `${text.trimEnd()}\n\n${results}\n`);
    return;
  }
  writeFileSync(BENCHMARKS_MD, `${introduction(benchCases)}\n${results}\n`);
}

function introduction(cases: BenchCase[]): string {
  return [
    '# Benchmarks',
    '',
    'Written by `npm run bench` (bench/run.ts) between the markers below; the rest is by hand.',
    '',
    ...cases.flatMap((c) => [`## ${c.title}`, '', c.description, '', `Target: ${c.targets.join('; ')}.${c.run ? '' : ' Not yet measured.'}`, '']),
  ].join('\n');
}
