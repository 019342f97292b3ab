// The registry of benchmark figures (issue 8). Every figure is a ratio against a baseline
// measured in the same run on the same machine. A case that is not implemented yet says so:
// it reports "not yet measured", never a made-up number.

export interface Figure {
  /** Stable name, the row label in the table and in BENCHMARKS.md. */
  name: string;
  /** A human-readable value, e.g. "0.62" or "14 ms". */
  value: string;
  target: string;
  /** undefined: informational, no target to pass or fail. */
  pass: boolean | undefined;
}

export interface CaseResult {
  figures: Figure[];
  /** Free-form lines for BENCHMARKS.md: raw req/s, row counts, anything behind the ratios. */
  details: string[];
}

export interface BenchCase {
  id: string;
  title: string;
  /** What the figure means, for BENCHMARKS.md. */
  description: string;
  /** The target(s), as printed when the case is not measured yet. */
  targets: string[];
  /** Absent: a slot waiting for its feature. */
  run?: (context: BenchContext) => Promise<CaseResult>;
}

export interface BenchContext {
  /** A Postgres server URL whose role may create and drop databases. */
  postgresUrl: string;
  /** Seconds of measured load per autocannon run. */
  seconds: number;
  /** The app's LOG_LEVEL under load (info, as in production, unless --log-level says otherwise). */
  logLevel: string;
  log: (line: string) => void;
}
