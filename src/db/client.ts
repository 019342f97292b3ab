import { fileURLToPath } from 'node:url';
import { drizzle as drizzlePglite } from 'drizzle-orm/pglite';
import { migrate as migratePglite } from 'drizzle-orm/pglite/migrator';
import { drizzle as drizzlePostgres } from 'drizzle-orm/postgres-js';
import { migrate as migratePostgres } from 'drizzle-orm/postgres-js/migrator';
import type { PgDatabase, PgQueryResultHKT } from 'drizzle-orm/pg-core';
import { sql, type SQL } from 'drizzle-orm';
import postgres from 'postgres';
import { openEmbedded } from './embedded.js';
import * as schema from './schema/index.js';

export type Schema = typeof schema;
/** A database or a transaction: queries take this first and never open their own transaction. */
export type Db = PgDatabase<PgQueryResultHKT, Schema>;

export interface Database {
  db: Db;
  driver: 'pglite' | 'postgres';
  /** Applies drizzle/ (the same folder drizzle-kit generates) before anything else runs. */
  migrate(): Promise<void>;
  close(): Promise<void>;
}

/**
 * A database read an operator is waiting on (/health, a metrics scrape), bounded: a database that
 * does not answer fails it within `ms` instead of the driver's connect timeout (30 s by default).
 */
export function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(Object.assign(new Error(`the database did not answer within ${ms} ms`), { name: 'TimeoutError', code: 'TIMEOUT' })), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** `db.execute` answers with an array (postgres.js) or `{rows}` (PGlite). */
export async function rowsOf<T>(result: Promise<unknown>): Promise<T[]> {
  const answer = (await result) as T[] | { rows: T[] };
  return Array.isArray(answer) ? answer : answer.rows;
}

export const migrationsFolder = fileURLToPath(new URL('../../drizzle', import.meta.url));

/** Arbitrary constant: serialises migrations when several replicas start at once on one Postgres. */
const MIGRATION_LOCK = 7_243_001;

export interface DatabaseOptions {
  /** postgres:// URL; unset → embedded PGlite. */
  url?: string | undefined;
  /** PGlite data directory; `memory://` for a throwaway database. */
  dataDir?: string;
  /**
   * A `memory://` database starts as a copy of this dump of another (PGlite's `dumpDataDir`)
   * instead of from initdb: the tests give each file a migrated database this way, in a quarter
   * of the time.
   */
  from?: Blob;
  /** Pool size for Postgres. */
  max?: number;
}

export function openDatabase(options: DatabaseOptions): Database {
  if (options.url) return openPostgres(options.url, options.max ?? 10);
  const dataDir = options.dataDir ?? 'memory://';
  const { client, unlock } = openEmbedded(dataDir, options.from);
  const db = drizzlePglite(client, { schema }) as unknown as Db;
  return {
    db,
    driver: 'pglite',
    // PGlite is one connection in this process: nothing else can migrate concurrently.
    migrate: () => migratePglite(drizzlePglite(client, { schema }), { migrationsFolder }),
    close: async () => {
      try {
        if (!client.closed) await client.close();
      } finally {
        unlock();
      }
    },
  };
}

function openPostgres(url: string, max: number): Database {
  // postgres.js's own reading of `?prepare=false` in the URL (an instance connects only when used).
  const prepare = postgres(url).options.prepare;
  const client = postgres(url, {
    max,
    onnotice: () => {},
    // Postgres may keep a generic plan for a prepared statement (planning afresh cost the gate
    // about a third of its database time); the hot lookups are written so that any plan of
    // them goes through an index (`headsByKey`).
    connection: { application_name: 'crm-bridge' },
  });
  const wrap = (sql: postgres.Sql) => (prepare ? namedStatements(sql) : sql);
  const db = drizzlePostgres(pipelinedBegin(wrap(client), wrap), { schema }) as unknown as Db;
  return {
    db,
    driver: 'postgres',
    migrate: async () => {
      // One connection, so the advisory lock and the migration share a session.
      const session = postgres(url, { max: 1, onnotice: () => {} });
      try {
        await answersAsPostgres(session);
        await session`select pg_advisory_lock(${MIGRATION_LOCK})`;
        await migratePostgres(drizzlePostgres(session, { schema }), { migrationsFolder });
      } catch (err) {
        // Ended at once: a session still trying to reach a server that is not Postgres would reconnect on.
        await session.end({ timeout: 0 });
        throw err;
      }
      await session.end({ timeout: 5 });
    },
    close: () => client.end({ timeout: 5 }),
  };
}

/** DATABASE_URL's server did not answer as Postgres: a wrong host or port, or Postgres not up. */
export class DatabaseUnreachableError extends Error {
  readonly code = 'DATABASE_UNREACHABLE';
  constructor(detail: string, options: { cause?: unknown }) {
    super(detail, options);
    this.name = 'DatabaseUnreachableError';
  }
}

/**
 * Waits for the server's first answer, at most postgres.js's connect timeout (30 s, or
 * `?connect_timeout=<seconds>` in DATABASE_URL), and fails with an error naming where it looked.
 * postgres.js alone gives up on a server that accepts the connection and stays silent only with
 * `write CONNECT_TIMEOUT host:port`, and on one that closes the connection (a DATABASE_URL port
 * pointing at another service) never: it reconnects without end, and the start failed only at
 * Fastify's plugin timeout (120 s), with a message about a plugin. An error the server itself
 * sends (a wrong password, no such database) is its own and passes through as it is.
 */
async function answersAsPostgres(session: postgres.Sql): Promise<void> {
  const { host, port, path, connect_timeout: seconds } = session.options;
  // Never from the URL itself: it carries the password.
  const where = path || host.map((name, i) => `${name.includes(':') ? `[${name}]` : name}:${port[i] ?? port[0]}`).join(',');
  try {
    await withTimeout(Promise.resolve(session`select 1`), seconds * 1000);
  } catch (err) {
    if (err instanceof postgres.PostgresError) throw err;
    const code = (err as { code?: unknown }).code;
    const reason =
      code === 'TIMEOUT' || code === 'CONNECT_TIMEOUT'
        ? `no answer within ${seconds} s`
        : code === 'ECONNREFUSED'
          ? 'the connection was refused'
          : code === 'ECONNRESET' || code === 'CONNECTION_CLOSED' || code === 'EPIPE'
            ? 'it closed the connection'
            : `${typeof code === 'string' ? `${code}: ` : ''}${(err as Error).message}`;
    throw new DatabaseUnreachableError(`The database at ${where} (DATABASE_URL) did not answer as Postgres (${reason}). Check DATABASE_URL's host and port, and that Postgres is up.`, { cause: err });
  }
}

/** Opens a statement marked by `lastStatement`. */
const LAST_STATEMENT = '/* last statement: COMMIT follows */ ';

/**
 * Marks `query` as the last statement of its transaction. On Postgres, COMMIT is queued right
 * behind it and written without waiting for its answer (in the same write when the statement is
 * under postgres.js's 1 KB threshold, in a write of its own just after it when larger), so the
 * backend commits without waiting for the client: one round trip fewer, and the transaction's
 * locks are held that much less. When the statement fails, the server answers the COMMIT with a
 * rollback and the transaction fails.
 * Nothing may run in the transaction after it (a statement is refused) and nothing may fail
 * after it: the commit is already on its way. On PGlite, or outside a transaction, it is an
 * ordinary statement. The hook path's batches end this way: end-to-end p99 27.6 and 26.5 ms
 * before, 23.1 and 24.3 ms after, in alternating runs (BENCHMARKS.md).
 */
export function lastStatement(query: SQL): SQL {
  return sql`${sql.raw(LAST_STATEMENT)}${query}`;
}

/**
 * Transactions whose BEGIN goes out with their first statement, and whose COMMIT goes out with
 * their last when the body marks it (`lastStatement`). postgres.js's `begin()` waits for BEGIN's
 * answer before the body runs: a round trip, and a write that wakes the backend, in every
 * transaction (a hook batch is BEGIN, the heads claim, the writes, COMMIT). Here the body runs on
 * a reserved connection at once; BEGIN is buffered and written with its first statement, in
 * order on that connection. Measured on ingest, alternating runs against the code before: 6-12%
 * more new hooks/s (BENCHMARKS.md).
 *
 * The connection goes back to the pool only once a COMMIT or ROLLBACK was answered. One that
 * failed by closing is left where postgres.js put it (its closed queue, reconnected on demand):
 * handing it back would put a dead socket in the pool. No ROLLBACK is sent on a closed one, and
 * a statement sent after the connection closed (the backend died between statements) fails with
 * CONNECTION_CLOSED instead of being written to the next session or a dead socket
 * (patches/postgres+3.4.9.patch, docs/operations.md).
 * The transaction's client is the reserved connection (prepared statements too, through `wrap`);
 * it offers no savepoints, and crm-bridge nests no transactions.
 */
function pipelinedBegin(client: postgres.Sql, wrap: (sql: postgres.Sql) => postgres.Sql): postgres.Sql {
  return new Proxy(client, {
    get(target, property) {
      if (property !== 'begin') return Reflect.get(target, property, target) as unknown;
      return async (...args: unknown[]) => {
        const body = args.pop() as (tx: postgres.TransactionSql) => unknown;
        const options = typeof args[0] === 'string' ? args[0].replace(/[^a-z ]/gi, '') : '';
        const reserved = await target.reserve();
        const begin = reserved.unsafe(`begin ${options}`).execute();
        // A failed BEGIN fails the body's first statement too; it is awaited before COMMIT.
        begin.catch(() => {});
        const { tx, commit } = commitsAfterLast(wrap(reserved), reserved);
        let answered = false;
        try {
          const result = await body(tx as unknown as postgres.TransactionSql);
          await begin;
          const ended = await (commit() ?? reserved.unsafe('commit'));
          answered = true;
          // A failed last statement turns its COMMIT into a rollback, even if the body caught the error.
          if (ended.command !== 'COMMIT') throw new Error(`The transaction was rolled back (its COMMIT answered ${ended.command}).`);
          return result;
        } catch (err) {
          const sent = commit();
          if (sent) {
            // COMMIT went out behind the last statement: its answer ended the transaction either way.
            await sent.then(
              () => void (answered = true),
              (failure: unknown) => void (answered = !isConnectionFailure(failure)),
            );
          } else if (!answered && !isConnectionFailure(err)) {
            await reserved.unsafe('rollback').then(
              () => void (answered = true),
              () => {},
            );
          }
          throw err;
        } finally {
          if (answered) reserved.release();
        }
      };
    },
  });
}

/**
 * A transaction's client that queues COMMIT right behind a statement marked by `lastStatement`
 * (on the same connection, so it is written right after it) and refuses any statement after it.
 * `commit()` is that COMMIT once queued.
 */
function commitsAfterLast(statements: postgres.Sql, connection: postgres.ReservedSql) {
  let commit: Promise<postgres.RowList<postgres.Row[]>> | undefined;
  const tx = new Proxy(statements, {
    get(target, property) {
      if (property !== 'unsafe') return Reflect.get(target, property, target) as unknown;
      return (query: string, ...rest: [postgres.ParameterOrJSON<never>[]?, postgres.UnsafeQueryOptions?]) => {
        if (commit) throw new Error("A statement after its transaction's last statement would run outside the transaction.");
        const pending = target.unsafe(query, ...rest);
        if (query.startsWith(LAST_STATEMENT)) {
          pending.execute();
          commit = connection.unsafe('commit').execute();
          commit.catch(() => {});
        }
        return pending;
      };
    },
  });
  return { tx, commit: () => commit };
}

/**
 * The connection is gone or going: postgres.js's own errors (`CONNECTION_CLOSED`, …), the
 * socket's (`ECONNRESET`, …), and a FATAL from the server (a terminated backend, a shutdown),
 * after which the server closes it.
 */
function isConnectionFailure(err: unknown): boolean {
  // drizzle wraps the driver's error as the cause of its own.
  for (let e = err; e instanceof Error; e = e.cause) {
    if (e instanceof postgres.PostgresError) return e.severity === 'FATAL' || e.severity === 'PANIC';
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && (code.startsWith('CONNECT') || 'errno' in e)) return true;
  }
  return false;
}

/**
 * drizzle runs every query through postgres.js as an unnamed statement, which postgres.js sends
 * as Parse+Describe, waits, then Bind+Execute: two round trips, and a parse and plan each time.
 * Named (prepared) statements take one round trip once a connection has seen the statement:
 * a hook's transaction went from about 7 to 5 ms here, the gate's batch from 4.8 to 2.6 ms.
 * Every hot statement has a fixed text (rows travel as JSON or array parameters), so a
 * connection prepares a bounded set. `?prepare=false` in DATABASE_URL (PgBouncer in transaction
 * mode before 1.21) turns preparing off.
 * See drizzle-team/drizzle-orm#5502.
 */
function namedStatements(sql: postgres.Sql): postgres.Sql {
  return new Proxy(sql, {
    get(target, property) {
      if (property === 'unsafe') {
        return (query: string, params?: postgres.ParameterOrJSON<never>[], options?: postgres.UnsafeQueryOptions) =>
          target.unsafe(query, params, { ...options, prepare: true });
      }
      return Reflect.get(target, property, target) as unknown;
    },
  });
}
