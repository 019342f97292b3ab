import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { MAX_TIMER_MS } from '../src/config/schema.js';
import { Daemon } from '../src/sync/daemon.js';

class Counting extends Daemon {
  ticks = 0;
  async tick(): Promise<void> {
    this.ticks++;
  }
}

describe('Daemon', () => {
  it('waits out an interval whose jitter takes it past what a timer can hold, instead of ticking again at once', async () => {
    // poll.interval at its most (24 days) with jitter: the pause passes the limit, and a timer
    // that long fires after 1 ms, so the loop would tick about once a millisecond.
    const daemon = new Counting({ name: 'long', intervalMs: MAX_TIMER_MS, jitter: 1, log: pino({ level: 'silent' }) });
    daemon.start();
    await new Promise((resolve) => setTimeout(resolve, 300));
    await daemon.stop();
    expect(daemon.ticks).toBe(1);
  });
});
