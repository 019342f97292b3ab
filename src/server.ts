import closeWithGrace from 'close-with-grace';
import { pino } from 'pino';
import { buildApp } from './app.js';
import { loadConfig } from './config/load.js';
import { demoConnections } from './demo/demo-connection.js';
import { loggerOptions } from './logger.js';

const SHUTDOWN_GRACE_MS = 10_000;

/** The process entry: configuration, logger, listen, and an ordered, time-boxed shutdown. */
export async function serve(): Promise<void> {
  let demo: ReturnType<typeof demoConnections> | undefined;
  const config = loadConfig(undefined, (env) => {
    demo = demoConnections(env.DATA_DIR);
    return { connections: demo.connections };
  });
  const logger = pino(loggerOptions(config.env.LOG_LEVEL));

  const app = await buildApp({ config, loggerInstance: logger, startDaemons: true });
  closeWithGrace({ delay: SHUTDOWN_GRACE_MS }, async ({ signal, err }) => {
    if (err) logger.error({ err }, 'crm-bridge is stopping after an unexpected error');
    else logger.info({ signal }, 'crm-bridge is stopping');
    await app.close();
  });

  const address = await app.listen({ port: config.env.PORT, host: config.env.HOST });
  const base = address.replace('0.0.0.0', '127.0.0.1').replace('[::]', '127.0.0.1');
  const lines = [
    `crm-bridge is listening on ${base} (database: ${app.database.driver === 'pglite' ? `embedded, in ${config.env.DATA_DIR}` : 'Postgres'})`,
    `  health:  curl ${base}/health`,
  ];
  if (demo) {
    lines.push(
      '  no CRM_BRIDGE_CONFIG: running the demo connection "demo". Its hook secret (kept in DATA_DIR):',
      `    ${demo.secret}`,
      '  send it a change as a CRM automation would:',
      `    curl -i -X POST ${base}/hooks/demo -H 'Authorization: Bearer ${demo.secret}' -H 'Content-Type: application/json' \\`,
      `      -d '{"id": 1001, "updated_at": "${new Date().toISOString()}", "display_number": "00001-Doe", "status": "Open"}'`,
    );
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}
