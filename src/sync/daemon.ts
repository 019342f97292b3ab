import { setTimeout as sleep } from 'node:timers/promises';
import type { FastifyBaseLogger } from 'fastify';
import { MAX_TIMER_MS } from '../config/schema.js';

export interface DaemonOptions {
  name: string;
  /** Pause between ticks. */
  intervalMs: number;
  /** Random extra pause, 0..1 of the interval, so replicas do not tick in lockstep. */
  jitter?: number;
  log: FastifyBaseLogger;
}

/**
 * A background loop with a lifecycle: `start()`, one `tick()` at a time, and a prompt `stop()`
 * through an AbortSignal. A failed tick is logged and the loop goes on.
 */
export abstract class Daemon {
  private controller: AbortController | undefined;
  private loop: Promise<void> | undefined;
  private wakeup: AbortController | undefined;
  private woken = false;

  constructor(protected readonly options: DaemonOptions) {}

  get name(): string {
    return this.options.name;
  }

  /** Started and not asked to stop. */
  get running(): boolean {
    return this.controller !== undefined && !this.controller.signal.aborted;
  }

  /** One unit of work. Returns true when there is more to do right away (skip the pause). */
  abstract tick(signal: AbortSignal): Promise<boolean | void>;

  start(): void {
    if (this.loop) return;
    const controller = new AbortController();
    this.controller = controller;
    this.loop = this.run(controller.signal);
  }

  /** Ends the current pause now (new work arrived in this process); a tick in progress is followed by another at once. */
  wake(): void {
    this.woken = true;
    this.wakeup?.abort();
  }

  /** The pause before the next tick: the interval, plus its jitter. */
  protected nextPause(): number {
    return this.options.intervalMs * (1 + Math.random() * (this.options.jitter ?? 0));
  }

  async stop(): Promise<void> {
    this.controller?.abort();
    await this.loop;
    this.loop = undefined;
    this.controller = undefined;
  }

  private async run(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      let more = false;
      try {
        more = (await this.tick(signal)) === true;
      } catch (err) {
        if (signal.aborted) break;
        this.options.log.error({ err, daemon: this.name }, `${this.name}: tick failed`);
      }
      if (more || this.woken) {
        this.woken = false;
        continue;
      }
      // An interval near a timer's limit, with its jitter, may pass it; a later tick finds itself early.
      const pause = Math.min(this.nextPause(), MAX_TIMER_MS);
      const wakeup = new AbortController();
      this.wakeup = wakeup;
      try {
        await sleep(pause, undefined, { signal: AbortSignal.any([signal, wakeup.signal]) });
      } catch {
        if (signal.aborted) break;
      } finally {
        this.wakeup = undefined;
        this.woken = false;
      }
    }
  }
}
