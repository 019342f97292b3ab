// `npx tsx bench/id-cost.ts`: the CPU a time-ordered id costs, uuid's own v7 against timeOrderedId
// (src/ids.ts), alternating in one process. Not part of `npm run bench`.
import { v7 } from 'uuid';
import { timeOrderedId } from '../src/ids.js';
const N = 1_000_000;
for (let round = 0; round < 3; round++) {
  for (const [name, f] of [['uuid v7', () => v7()], ['timeOrderedId', timeOrderedId]] as const) {
    const t = process.cpuUsage();
    let last = '';
    for (let i = 0; i < N; i++) { const id = f(); if (id <= last) throw new Error(`not ordered: ${last} then ${id}`); last = id; }
    const u = process.cpuUsage(t);
    console.log(name, (((u.user + u.system) / N) * 1000).toFixed(0), 'ns CPU an id');
  }
}
