import type { Db } from '../db/client.js';
import { passChanges, recordNotification, type GateOutcome, type ObservedChange } from './change-gate.js';

type Job =
  | { kind: 'change'; change: ObservedChange; resolve: (o: GateOutcome) => void; reject: (e: unknown) => void }
  | { kind: 'notification'; note: Parameters<typeof recordNotification>[1]; resolve: (o: GateOutcome) => void; reject: (e: unknown) => void };

export interface ChangeWriterOptions {
  /** Most changes committed in one transaction. */
  maxBatch?: number;
  /** Transactions in flight at once (Postgres pool permitting; PGlite serialises anyway). */
  concurrency?: number;
}

/**
 * Group commit for the hook path: concurrent requests that arrive while a commit is in flight
 * share the next transaction. Each change still goes through the same gate, in arrival order,
 * and each caller is answered only after its transaction committed. A failed batch is retried
 * one change per transaction, so one bad change cannot fail its neighbours.
 */
export class ChangeWriter {
  private readonly queue: Job[] = [];
  private inFlight = 0;
  private readonly maxBatch: number;
  private readonly concurrency: number;
  private gathering = false;

  constructor(
    private readonly db: Db,
    options: ChangeWriterOptions = {},
  ) {
    this.maxBatch = options.maxBatch ?? 64;
    this.concurrency = options.concurrency ?? 4;
  }

  submit(change: ObservedChange): Promise<GateOutcome> {
    return new Promise((resolve, reject) => this.enqueue({ kind: 'change', change, resolve, reject }));
  }

  submitNotification(note: Parameters<typeof recordNotification>[1]): Promise<GateOutcome> {
    return new Promise((resolve, reject) => this.enqueue({ kind: 'notification', note, resolve, reject }));
  }

  /**
   * A change waits for the end of the event loop's I/O phase before its batch starts, so requests
   * that arrived together share a transaction. Starting at once would send the first request
   * alone; and on PGlite, whose statements run in the event loop itself, the whole transaction
   * would run before the next request is read, so every batch would hold one change.
   */
  private enqueue(job: Job): void {
    this.queue.push(job);
    if (this.gathering) return;
    this.gathering = true;
    setImmediate(() => {
      this.gathering = false;
      this.pump();
    });
  }

  private pump(): void {
    while (this.inFlight < this.concurrency && this.queue.length > 0) {
      const batch = this.queue.splice(0, this.maxBatch);
      this.inFlight++;
      void this.commit(batch).finally(() => {
        this.inFlight--;
        this.pump();
      });
    }
  }

  private async commit(batch: Job[]): Promise<void> {
    try {
      const outcomes = await this.db.transaction((tx) => run(tx, batch));
      batch.forEach((job, i) => job.resolve(outcomes[i]!));
    } catch (err) {
      if (batch.length === 1) {
        batch[0]!.reject(err);
        return;
      }
      for (const job of batch) {
        try {
          const [outcome] = await this.db.transaction((tx) => run(tx, [job]));
          job.resolve(outcome!);
        } catch (single) {
          job.reject(single);
        }
      }
    }
  }
}

async function run(tx: Db, batch: Job[]): Promise<GateOutcome[]> {
  const changes = batch.flatMap((job) => (job.kind === 'change' ? [job.change] : []));
  // A batch of changes alone ends with the gate's write, which then goes out with the COMMIT.
  const changeOutcomes = await passChanges(tx, changes, { last: changes.length === batch.length });
  const outcomes: GateOutcome[] = [];
  let c = 0;
  for (const job of batch) {
    outcomes.push(job.kind === 'change' ? changeOutcomes[c++]! : await recordNotification(tx, job.note));
  }
  return outcomes;
}
