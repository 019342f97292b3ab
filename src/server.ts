import closeWithGrace from 'close-with-grace';
import { pino } from 'pino';
import { buildApp } from './app.js';
import { loadConfig, loadEnv, type Config } from './config/load.js';
import { demoHookSecret } from './demo/demo-connection.js';
import { startDemoWorld, type DemoWorld } from './demo/demo-world.js';
import { processLoggerOptions } from './logger.js';

const SHUTDOWN_GRACE_MS = 10_000;

/**
 * The process entry: configuration, logger, listen, and an ordered, time-boxed shutdown. Without
 * a connections file it runs the demo: the sandbox CRM, staff editing it and a demo pipeline.
 */
export async function serve(): Promise<void> {
  let env;
  try {
    env = loadEnv();
  } catch (err) {
    loadConfig(); // throws one error naming the bad environment and the connections file's problems
    throw err;
  }
  const logger = pino(processLoggerOptions(env.LOG_LEVEL, env.LOG_FORMAT, process.stdout.isTTY === true));
  let demo: DemoWorld | undefined;
  let config: Config;
  if (env.CRM_BRIDGE_CONFIG === undefined) {
    demo = await startDemoWorld(logger, demoHookSecret(env.DATA_DIR));
    config = loadConfig(undefined, { connections: demo.connections });
  } else {
    config = loadConfig();
  }

  const app = await buildApp({ config, loggerInstance: logger, startDaemons: true });
  closeWithGrace({ delay: SHUTDOWN_GRACE_MS }, async ({ signal, err }) => {
    if (err) logger.error({ err }, 'crm-bridge is stopping after an unexpected error');
    else logger.info({ signal }, 'crm-bridge is stopping');
    await app.close();
    await demo?.close();
  });

  const address = await app.listen({ port: config.env.PORT, host: config.env.HOST });
  const base = address.replace('0.0.0.0', '127.0.0.1').replace('[::]', '127.0.0.1');
  const lines = [
    `crm-bridge is listening on ${base} (database: ${app.database.driver === 'pglite' ? `embedded, in ${config.env.DATA_DIR}` : 'Postgres'})`,
    `  status page:  ${base}/  ${config.env.ADMIN_TOKEN ? '(log in with any user and ADMIN_TOKEN as the password)' : '(answers 401: set ADMIN_TOKEN to open it and /docs)'}`,
    `  health:       curl ${base}/health`,
  ];
  if (!demo && app.database.driver === 'pglite') {
    lines.push('  embedded database: one process only; set DATABASE_URL to run replicas (docs/operations.md)');
  }
  if (demo) {
    await demo.start(app, base);
    const secret = demo.hookSecret;
    lines.push(
      '',
      'No CRM_BRIDGE_CONFIG, so this is the demo: a whole firm in one process.',
      `  sandbox CRM:  ${demo.sandbox.url}  (Clio Manage v4 dialect; its automation drops about 1 hook in 5, its tokens die early)`,
      `  pipeline:     ${demo.pipelineUrl}/intake  (a stand-in intake pipeline that logs what it receives)`,
      '  staff:        edit, create and delete matters every few seconds',
      '  send a change as the CRM automation would (the hook secret is kept in DATA_DIR):',
      `    curl -i -X POST ${base}/hooks/demo -H 'Authorization: Bearer ${secret}' -H 'Content-Type: application/json' \\`,
      `      -d '{"data": {"id": 1001, "updated_at": "${new Date().toISOString()}", "description": "Called the client back", "status": "Open"}}'`,
      'Ctrl-C stops everything.',
    );
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}
