import { configDefaults, defineConfig } from 'vitest/config';
import { BaseSequencer, type TestSpecification } from 'vitest/node';

/**
 * Test files that never open a database (the sandbox CRM, the CRM HTTP client and connectors,
 * ids, the daemon loop): the run under DATABASE_URL leaves them to the run on the embedded
 * database, which runs every file. CI runs both.
 */
const DATABASE_FREE = [
  'test/sandbox/**',
  'test/crm/http-client.test.ts',
  'test/crm/presets.test.ts',
  'test/crm/jsonapi-connector.test.ts',
  'test/ids.test.ts',
  'test/daemon.test.ts',
  'test/database-unreachable.test.ts',
];

/**
 * The files that start processes (a CLI command or a bridge each, and the embedded database's
 * creation): the longest files by far, though small. Without vitest's cache of durations (a
 * clean checkout, as in CI) files run largest first, which left these for the end of the run
 * with one worker idle beside them; they go first instead.
 */
const SLOWEST = ['test/server-process.test.ts', 'test/cli-ops.test.ts', 'test/cli-poll.test.ts', 'test/soak.test.ts', 'test/embedded-durability.test.ts', 'test/crm/token-cli.test.ts', 'test/delivery-processes.test.ts'];

class SlowestFirst extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const sorted = await super.sort(files);
    const rank = (file: TestSpecification) => {
      const i = SLOWEST.findIndex((name) => file.moduleId.endsWith(name));
      return i < 0 ? SLOWEST.length : i;
    };
    return sorted.map((file, i) => ({ file, i })).sort((a, b) => rank(a.file) - rank(b.file) || a.i - b.i).map(({ file }) => file);
  }
}

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/helpers/global-setup.ts'],
    exclude: [...configDefaults.exclude, ...(process.env.DATABASE_URL ? DATABASE_FREE : [])],
    // PGlite takes seconds to boot and Postgres-backed suites share one server: run files in
    // forked workers, two at a time on this 2-core class of machine.
    pool: 'forks',
    sequence: { sequencer: SlowestFirst },
    maxWorkers: 2,
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
