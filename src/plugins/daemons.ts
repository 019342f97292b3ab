import type { FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';
import type { Daemon } from '../sync/daemon.js';

declare module 'fastify' {
  interface FastifyInstance {
    /** Background loops (poller, delivery, ...). Plugins push theirs here while registering. */
    daemons: Daemon[];
  }
}

/**
 * Starts the daemons once the app is ready and stops them before the database closes (close
 * hooks run in reverse registration order). Tests build the app with `startDaemons: false`
 * and drive `tick()` themselves.
 */
export default fp(
  async (app: FastifyInstance, opts: { startDaemons: boolean }) => {
    app.decorate('daemons', []);
    if (opts.startDaemons) {
      app.addHook('onReady', async () => {
        for (const daemon of app.daemons) daemon.start();
      });
    }
    app.addHook('onClose', async () => {
      await Promise.all(app.daemons.map((d) => d.stop()));
    });
  },
  { name: 'daemons', dependencies: ['db'] },
);
