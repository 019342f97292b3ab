import { execFileSync } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { sql } from 'drizzle-orm';
import postgres from 'postgres';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { lastStatement, rowsOf } from '../src/db/client.js';
import { leases } from '../src/db/schema/index.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

// One connection, so a transaction that left its connection in a bad state (still inside a
// transaction, aborted, or never handed back) would break or stall the next one.
const database = await createTestDatabase({ max: 1 });
const { db } = database;
afterAll(() => database.close());
beforeEach(() => resetDatabase(database));

const lease = (name: string) => ({ name, owner: 'test', expiresAt: new Date() });
const names = async () => (await db.select({ name: leases.name }).from(leases).orderBy(leases.name)).map((r) => r.name);

describe('transactions', () => {
  it('runs the first statement inside the transaction: every statement sees one transaction time', async () => {
    const [first, second] = await db.transaction(async (tx) => {
      const [a] = await rowsOf<{ t: string }>(tx.execute(sql`select now()::text as t`));
      await sleep(20);
      const [b] = await rowsOf<{ t: string }>(tx.execute(sql`select now()::text as t`));
      return [a!.t, b!.t];
    });
    expect(second).toBe(first);
  });

  it('rolls back the statements before a failed one, and the connection serves the next transaction', async () => {
    await expect(
      db.transaction(async (tx) => {
        await tx.insert(leases).values(lease('a'));
        await tx.insert(leases).values(lease('a'));
      }),
    ).rejects.toThrow(/Failed query: insert into "leases"/);
    expect(await names()).toEqual([]);
    await db.transaction(async (tx) => {
      await tx.insert(leases).values(lease('b'));
    });
    expect(await names()).toEqual(['b']);
  });

  it('rolls back when the body throws between statements, or before its first', async () => {
    await expect(
      db.transaction(async (tx) => {
        await tx.insert(leases).values(lease('a'));
        throw new Error('changed my mind');
      }),
    ).rejects.toThrow('changed my mind');
    await expect(
      db.transaction(async () => {
        throw new Error('before any statement');
      }),
    ).rejects.toThrow('before any statement');
    expect(await names()).toEqual([]);
    await db.insert(leases).values(lease('c'));
    expect(await names()).toEqual(['c']);
  });

  it('queues transactions and queries for the one connection instead of failing them', async () => {
    await Promise.all([
      ...['a', 'b', 'c'].map((name) =>
        db.transaction(async (tx) => {
          await tx.insert(leases).values(lease(name));
          await sleep(10);
        }),
      ),
      db.insert(leases).values(lease('d')),
    ]);
    expect(await names()).toEqual(['a', 'b', 'c', 'd']);
  });
});

describe('a transaction ending with lastStatement', () => {
  const insertLease = (name: string) => lastStatement(sql`insert into leases (name, owner, expires_at) values (${name}, 'test', now())`);

  it('commits the statements before it and itself', async () => {
    const result = await db.transaction(async (tx) => {
      await tx.insert(leases).values(lease('a'));
      await tx.execute(insertLease('b'));
      return 'done';
    });
    expect(result).toBe('done');
    expect(await names()).toEqual(['a', 'b']);
  });

  it('rolls everything back when it fails, also when the body catches the failure, and the connection serves the next transaction', async () => {
    await expect(
      db.transaction(async (tx) => {
        await tx.insert(leases).values(lease('a'));
        await tx.execute(insertLease('a'));
      }),
    ).rejects.toThrow(/duplicate key|Failed query/);
    await expect(
      db.transaction(async (tx) => {
        await tx.insert(leases).values(lease('b'));
        await tx.execute(insertLease('b')).catch(() => {});
        return 'swallowed';
      }),
    ).rejects.toThrow();
    expect(await names()).toEqual([]);
    await db.transaction(async (tx) => {
      await tx.execute(insertLease('c'));
    });
    expect(await names()).toEqual(['c']);
  });
});

describe.skipIf(database.url === undefined)('transactions on Postgres', () => {
  it('sends COMMIT behind a last statement: the transaction commits while this process is not looking', async () => {
    const count = () => execFileSync('psql', ['-Atc', 'select count(*) from leases', database.url!], { encoding: 'utf8' }).trim();
    let seenWhileBlocked: string | undefined;
    await db.transaction(async (tx) => {
      await tx.insert(leases).values(lease('a'));
      const last = tx.execute(lastStatement(sql`select pg_sleep(0.05)`));
      // The statement (and, behind it, COMMIT) is written before this timer fires; the timer then
      // blocks this process's event loop well past the statement's end, so no COMMIT could be
      // sent from here meanwhile.
      setTimeout(() => {
        execFileSync('sleep', ['0.3']);
        seenWhileBlocked = count();
      }, 10);
      await last;
    });
    expect(seenWhileBlocked).toBe('1');
  });

  it('refuses a statement after the last one: it would run outside the transaction', async () => {
    const refused = await db
      .transaction(async (tx) => {
        await tx.execute(lastStatement(sql`select 1`));
        await tx.insert(leases).values(lease('outside'));
      })
      .catch((err: Error) => err);
    // drizzle names the query and keeps the reason as the cause.
    expect(((refused as Error).cause as Error).message).toMatch(/after its transaction's last statement/);
    expect(await names()).toEqual([]);
    await db.insert(leases).values(lease('d'));
    expect(await names()).toEqual(['d']);
  });

  // postgres.js 3.4.9 is patched for these (patches/postgres+3.4.9.patch, porsager/postgres#1208).
  type Tx = Parameters<Parameters<typeof db.transaction>[0]>[0];
  const backendOf = async (tx: Tx) => (await rowsOf<{ pid: number }>(tx.execute(sql`select pg_backend_pid() as pid`)))[0]!.pid;
  /** Runs a long statement in the transaction and terminates its backend while Postgres shows it running; answers its failure. */
  const terminateMidStatement = async (tx: Tx, admin: postgres.Sql) => {
    const pid = await backendOf(tx);
    // A drizzle query starts only when awaited: start it now, or it would be sent after the termination.
    const slow = Promise.resolve(tx.execute(sql`select pg_sleep(5)`));
    slow.catch(() => {});
    for (;;) {
      const [row] = await admin<{ state: string | null }[]>`select state from pg_stat_activity where pid = ${pid} and query like '%pg_sleep%'`;
      if (row?.state === 'active') break;
      await sleep(5);
    }
    await admin`select pg_terminate_backend(${pid})`;
    await slow;
  };
  /** A connection of its own for terminating backends, ended afterwards. */
  const asAdmin = async (body: (admin: postgres.Sql) => Promise<void>) => {
    const admin = postgres(database.url!, { max: 1, onnotice: () => {} });
    try {
      await body(admin);
    } finally {
      await admin.end();
    }
  };
  /** Nothing of the failed transaction was kept, and the one connection serves the next transaction. */
  const poolGoesOn = async () => {
    expect(await names()).toEqual([]);
    await db.transaction(async (tx) => {
      await tx.insert(leases).values(lease('after'));
    });
    expect(await names()).toEqual(['after']);
  };

  it('fails a transaction whose backend is terminated mid-statement without sending anything more on the dead connection, and the pool goes on', () =>
    asAdmin(async (admin) => {
      const failed = db.transaction(async (tx) => {
        await tx.insert(leases).values(lease('lost'));
        await terminateMidStatement(tx, admin);
      });
      await expect(failed).rejects.toThrow(/select pg_sleep/);
      // The next query gets a new session: not the dead one's error, and no wait.
      await poolGoesOn();
    }));

  it('fails the next statement of a transaction whose backend died between statements, without crashing the process, and the pool goes on', async () => {
    // A page of the poller waits, inside its transaction, for the page before it to commit; a
    // Postgres restart then closes its connection while it is idle. Its next statement used to
    // be written to the closed socket from a timer: an uncaught TypeError, and a query that
    // never settled.
    await asAdmin(async (admin) => {
      const failed = db.transaction(async (tx) => {
        await tx.insert(leases).values(lease('lost'));
        const pid = await backendOf(tx);
        await admin`select pg_terminate_backend(${pid})`;
        for (;;) {
          const [row] = await admin<{ n: number }[]>`select count(*)::int as n from pg_stat_activity where pid = ${pid}`;
          if (row!.n === 0) break;
          await sleep(5);
        }
        // Time for this process to read the close (on a busy machine the statement may still
        // meet the socket closing, and fail with the socket's error instead).
        await sleep(20);
        await tx.insert(leases).values(lease('too late'));
      });
      await expect(failed).rejects.toThrow(/insert into "leases"/);
      const cause = ((await failed.catch((err: Error) => err)) as Error).cause as { code?: string };
      expect(cause.code).toMatch(/^(CONNECTION_CLOSED|ECONNRESET|EPIPE|57P01)$/);
      await poolGoesOn();
    });
  });

  it('reconnects at once after every one of many terminated backends: the backoff starts again after each new session', async () => {
    // Left unpatched, the first query of each new session failed with the dead session's error,
    // and the reconnect backoff never reset: 3^n/100 s, 7-20 s a reconnect by the seventh.
    await asAdmin(async (admin) => {
      for (let round = 0; round < 8; round++) {
        const failed = db.transaction((tx) => terminateMidStatement(tx, admin));
        await expect(failed).rejects.toThrow(/select pg_sleep/);
        await db.insert(leases).values(lease(`round ${round}`));
      }
      expect(await names()).toHaveLength(8);
    });
  }, 30_000);
});

describe.skipIf(database.url !== undefined)('the embedded database', () => {
  it('starts with 32 MB of shared buffers and the settings of its postgresql.conf', async () => {
    const [row] = await rowsOf<{ buffers: string; zone: string }>(db.execute(sql`select current_setting('shared_buffers') as buffers, current_setting('TimeZone') as zone`));
    expect(row).toEqual({ buffers: '32MB', zone: 'UTC' });
  });
});
