import { afterEach, describe, expect, it, vi } from 'vitest';
import { timeOrderedId } from '../src/ids.js';

const UUID_V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const msecsOf = (id: string) => parseInt(id.slice(0, 8) + id.slice(9, 13), 16);

describe('timeOrderedId', () => {
  afterEach(() => {
    vi.restoreAllMocks();
  });

  it('makes version 7 UUIDs carrying the time, each after the one before, many within one millisecond and across refills of its random pool', () => {
    const before = Date.now();
    const ids = Array.from({ length: 20_000 }, () => timeOrderedId());
    const after = Date.now();
    for (const id of ids) expect(id).toMatch(UUID_V7);
    for (let i = 1; i < ids.length; i++) expect(ids[i]! > ids[i - 1]!).toBe(true);
    expect(new Set(ids).size).toBe(ids.length);
    // 20,000 ids take far fewer milliseconds: the counter, not the clock, orders most of them.
    expect(new Set(ids.map(msecsOf)).size).toBeLessThan(ids.length / 10);
    expect(msecsOf(ids[0]!)).toBeGreaterThanOrEqual(before);
    expect(msecsOf(ids.at(-1)!)).toBeLessThanOrEqual(after + 1);
    // The random part is random: the last 12 hex digits of two ids made in a row differ.
    expect(new Set(ids.map((id) => id.slice(-12))).size).toBe(ids.length);
  });

  it('keeps counting up when the clock steps back, and takes the clock again once it passes the last id', () => {
    const now = Date.now() + 60_000;
    const clock = vi.spyOn(Date, 'now').mockReturnValue(now);
    const first = timeOrderedId();
    clock.mockReturnValue(now - 90_000); // NTP steps the clock back 90 s
    const stepped = [timeOrderedId(), timeOrderedId()];
    expect(stepped[0]! > first).toBe(true);
    expect(stepped[1]! > stepped[0]!).toBe(true);
    expect(msecsOf(stepped[1]!)).toBe(now);
    clock.mockReturnValue(now + 5);
    const later = timeOrderedId();
    expect(later > stepped[1]!).toBe(true);
    expect(msecsOf(later)).toBe(now + 5);
  });
});
