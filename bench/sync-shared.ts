// What the sync benchmarks' parent and child processes share (a module without side effects).

export const BENCH_CONNECTION_ID = 'bench';
export const BENCH_HOOK_SECRET = 'bench-hook-secret-0123456789abcdef';
export const BENCH_TOKEN_KEY = Buffer.alloc(32, 7).toString('base64');
export const SANDBOX_CLIENT = { clientId: 'sandbox-client', clientSecret: 'sandbox-secret' } as const;

/** A Clio matter of about 1 KB as the sandbox renders it (the preset's fields), id and send time varying. */
export function benchMatter(id: number, sentAt?: number): Record<string, unknown> {
  return {
    id,
    etag: `"${id.toString(16)}"`,
    number: id,
    display_number: `${id}-Doe`,
    description: `Slip and fall at grocery store. ${'Client reports a wet floor without signage near aisle 7; witness statements pending. '.repeat(8)}`,
    status: 'Open',
    location: 'Springfield',
    client_reference: null,
    billable: true,
    open_date: '2026-11-01',
    pending_date: null,
    close_date: null,
    created_at: '2026-11-01T09:00:00Z',
    updated_at: '2026-11-20T10:00:00Z',
    client: { id: 9001, name: 'Jane Doe' },
    practice_area: { id: 3007, name: 'Personal Injury' },
    ...(sentAt === undefined ? {} : { bench_sent_at: sentAt }),
  };
}
