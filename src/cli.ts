import { Command, CommanderError } from 'commander';
import { ConfigError } from './config/load.js';

/** The `crm-bridge` command. Operator mistakes end in one line and the usage, exit status 2. */
const program = new Command()
  .name('crm-bridge')
  .description('Keeps an intake pipeline in reliable two-way sync with a legacy CRM.')
  .showHelpAfterError()
  .exitOverride();

program
  .command('serve', { isDefault: true })
  .description('run the bridge: hooks, health and (as configured) the poller and delivery')
  .action(async () => {
    const { serve } = await import('./server.js');
    await serve();
  });

program
  .command('migrate')
  .description('apply database migrations and exit (the server also applies them at start)')
  .action(async () => {
    const { loadEnv } = await import('./config/load.js');
    const { openDatabase } = await import('./db/client.js');
    const { join } = await import('node:path');
    const env = loadEnv();
    const database = openDatabase({ url: env.DATABASE_URL, dataDir: join(env.DATA_DIR, 'pgdata') });
    try {
      await database.migrate();
      process.stdout.write(`migrations applied (${database.driver})\n`);
    } finally {
      await database.close();
    }
  });

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    process.exit(err.exitCode === 0 ? 0 : 2);
  }
  if (err instanceof ConfigError) {
    process.stderr.write(`${err.message}\n`);
    process.exit(2);
  }
  process.stderr.write(`crm-bridge: ${(err as Error).message}\n`);
  process.exit(1);
}
