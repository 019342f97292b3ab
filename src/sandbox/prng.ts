// mulberry32: four lines, fast and good enough for test data. Seed data must be reproducible
// from `--seed` alone, so nothing in the sandbox's data path may call Math.random.
export type Rng = () => number;

export function mulberry32(seed: number): Rng {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function pick<T>(rng: Rng, items: readonly T[]): T {
  const item = items[Math.floor(rng() * items.length)];
  if (item === undefined) throw new Error('pick from an empty list');
  return item;
}

/** FNV-1a over a few integers: cheap, stable etags without storing them. */
export function hashInts(...values: number[]): string {
  let h = 0x811c9dc5;
  for (const v of values) {
    let x = Math.floor(v);
    for (let i = 0; i < 8; i++) {
      h ^= x & 0xff;
      h = Math.imul(h, 0x01000193);
      x = Math.floor(x / 256);
    }
  }
  return (h >>> 0).toString(16).padStart(8, '0');
}
