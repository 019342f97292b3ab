import type { Db } from '../db/client.js';
import type { ClaimedDelivery } from '../db/queries/outbox.js';
import { passChanges, recordNotification, type GateOutcome, type LeaseOffer, type ObservedChange } from './change-gate.js';

type Job =
  | { kind: 'change'; change: ObservedChange; resolve: (o: GateOutcome) => void; reject: (e: unknown) => void }
  | { kind: 'notification'; note: Parameters<typeof recordNotification>[1]; resolve: (o: GateOutcome) => void; reject: (e: unknown) => void };

export interface ChangeWriterOptions {
  /** Most changes committed in one transaction. */
  maxBatch?: number;
  /** Transactions in flight at once (Postgres pool permitting; PGlite serialises anyway). */
  concurrency?: number;
}

/** A delivery worker of this process, as the writer sees it (`DeliveryWorker`). */
export interface LeaseTaker {
  offerLeases(want: number): LeaseOffer | undefined;
  /** Settles an offer: the rows leased under it, once their transaction committed (none if it failed). */
  takeLeased(offer: LeaseOffer, rows: readonly ClaimedDelivery[]): void;
  /** Rows are due that it must claim. */
  wake(): void;
}

/** Per connection of a batch, its worker and the leases it offered for the batch. */
type Offers = Map<string, { worker: LeaseTaker; offer: LeaseOffer }>;

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
  private workers: ((connectionId: string) => LeaseTaker | undefined) | undefined;

  constructor(
    private readonly db: Db,
    options: ChangeWriterOptions = {},
  ) {
    this.maxBatch = options.maxBatch ?? 64;
    this.concurrency = options.concurrency ?? 4;
  }

  /**
   * The delivery workers of this process: a batch then writes its delivered changes' outbox rows
   * leased to them and hands them over once it committed, so a hook's change is sent without
   * waiting for a claim (see `passChanges`); a worker with a delivered row it could not lease is
   * woken to claim it rather than wait for its next tick.
   */
  deliverThrough(workers: (connectionId: string) => LeaseTaker | undefined): void {
    this.workers = workers;
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
    const offers = this.offerLeases(batch);
    try {
      const outcomes = await this.db.transaction((tx) => run(tx, batch, offers));
      this.handOver(batch, outcomes, offers);
      batch.forEach((job, i) => job.resolve(outcomes[i]!));
    } catch (err) {
      for (const { worker, offer } of offers.values()) worker.takeLeased(offer, []);
      if (batch.length === 1) {
        batch[0]!.reject(err);
        return;
      }
      for (const job of batch) {
        try {
          const outcomes = await this.db.transaction((tx) => run(tx, [job]));
          this.handOver([job], outcomes, new Map());
          job.resolve(outcomes[0]!);
        } catch (single) {
          job.reject(single);
        }
      }
    }
  }

  /** Committed: each worker gets the rows leased to it, and is woken for delivered rows it did not. */
  private handOver(batch: Job[], outcomes: GateOutcome[], offers: Offers): void {
    const leased = new Map<string, ClaimedDelivery[]>();
    const unleased = new Set<string>();
    batch.forEach((job, i) => {
      const outcome = outcomes[i]!;
      if (job.kind !== 'change' || !outcome.delivered) return;
      const { connectionId } = job.change;
      if (outcome.leased === undefined) unleased.add(connectionId);
      else if (leased.has(connectionId)) leased.get(connectionId)!.push(outcome.leased);
      else leased.set(connectionId, [outcome.leased]);
    });
    for (const [connectionId, { worker, offer }] of offers) worker.takeLeased(offer, leased.get(connectionId) ?? []);
    for (const connectionId of unleased) this.workers?.(connectionId)?.wake();
  }

  /** Per connection in the batch, its worker's offer of leases for the batch's changes. */
  private offerLeases(batch: Job[]): Offers {
    const offers: Offers = new Map();
    if (this.workers === undefined) return offers;
    const wanted = new Map<string, number>();
    for (const job of batch) if (job.kind === 'change') wanted.set(job.change.connectionId, (wanted.get(job.change.connectionId) ?? 0) + 1);
    for (const [connectionId, want] of wanted) {
      const worker = this.workers(connectionId);
      const offer = worker?.offerLeases(want);
      if (worker && offer) offers.set(connectionId, { worker, offer });
    }
    return offers;
  }
}

async function run(tx: Db, batch: Job[], offers: Offers = new Map()): Promise<GateOutcome[]> {
  const changes = batch.flatMap((job) => (job.kind === 'change' ? [job.change] : []));
  const leases = new Map([...offers].map(([connectionId, { offer }]) => [connectionId, offer]));
  // A batch of changes alone ends with the gate's write, which then goes out with the COMMIT.
  const changeOutcomes = await passChanges(tx, changes, { last: changes.length === batch.length, leases });
  const outcomes: GateOutcome[] = [];
  let c = 0;
  for (const job of batch) {
    outcomes.push(job.kind === 'change' ? changeOutcomes[c++]! : await recordNotification(tx, job.note));
  }
  return outcomes;
}
