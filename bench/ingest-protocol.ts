// What the ingest bench process and its server child say to each other over IPC.

export type ServerMessage =
  | { type: 'listening'; url: string }
  | { type: 'verified'; ledgerRows: number; outboxRows: number; ledgerMatches: number; outboxMatches: number }
  | { type: 'failed'; message: string };

export type ParentMessage = { type: 'verify'; acceptedEventIds: string[]; duplicateEventIds: string[] } | { type: 'stop' };

export const HOOK_SECRET = 'bench-hook-secret-0123456789abcdef';

/** The object the bench bridge's connection maps every hook to (bench/gate-cost.ts passes the same). */
export const BENCH_MATTERS = {
  idPath: 'id',
  updatedAtPath: 'updated_at',
  fields: { name: 'display_number', status: 'status', practiceArea: 'practice_area.name', description: 'description' },
};
