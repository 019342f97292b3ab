import { configDefaults, defineConfig } from 'vitest/config';

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
];

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/helpers/global-setup.ts'],
    exclude: [...configDefaults.exclude, ...(process.env.DATABASE_URL ? DATABASE_FREE : [])],
    // PGlite takes seconds to boot and Postgres-backed suites share one server: run files in
    // forked workers, two at a time on this 2-core class of machine.
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
