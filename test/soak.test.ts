import { describe, expect, it } from 'vitest';
import { formatTable, runSoak } from '../soak/soak.js';

// The short soak of issue 8: the same driver as `npm run soak`, two `crm-bridge serve` processes
// on Postgres against the sandbox with every lie on, a few thousand changes and one SIGKILL. No
// Postgres restart here: CI's database server is shared by the whole test run.
describe.skipIf(!process.env.DATABASE_URL)('the short soak', () => {
  it('loses no change, loops no echo, reuses no refresh token and answers no hook with a 5xx through a SIGKILL', async () => {
    const result = await runSoak({
      databaseUrl: process.env.DATABASE_URL!,
      changes: 3_000,
      writes: 300,
      kills: 1,
      pgRestarts: 0,
      rate: 200,
      seed: 11,
      records: 1_000,
      pollInterval: '2s',
      sweepInterval: '10s',
      timeoutMs: 110_000,
      log: (line) => console.log(line),
    });
    const table = formatTable(result);
    console.log(table);
    expect(result.checks.filter((c) => !c.ok), table).toEqual([]);
  }, 150_000);
});
