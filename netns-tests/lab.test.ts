/**
 * issue 14 part 4 (docs/lab.md): tether's soft-dirty tracker on the kernel real hosts run.
 * This machine's kernel has no CONFIG_MEM_SOFT_DIRTY; the Debian lab guest boots Debian's
 * 6.1 cloud kernel (soft-dirty, swap, shmem THP) and runs tools/lab/lab.ts from this checkout
 * with Debian's nodejs and the host-built native addon: the production trackers against
 * labwriter, a process writing a MAP_SHARED tmpfs file as QEMU writes guest RAM. One boot.
 * No network namespace: the VM has no NIC; it sits here to run once per `npm test`.
 */
import { writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { runLab } from '../tools/lab/vm.ts';

type Rec = Record<string, unknown>;

const run = await runLab('check');
const consoleLog = path.join(os.tmpdir(), 'tether-lab-check.console.log');
writeFileSync(consoleLog, run.console);
const all = run.results;
const of = (c: string) => all.filter((r) => r['case'] === c);
const one = (c: string, pred: (r: Rec) => boolean = () => true): Rec => {
  const r = of(c).find(pred);
  if (!r) throw new Error(`lab: no ${c} record (console: ${consoleLog})`);
  return r;
};
t.comment(`lab VM: accel ${run.accel}, ${run.seconds.toFixed(1)} s; its console (every LAB record) in ${consoleLog}`);

t.test('the lab program ran to the end in the Debian guest', async (t) => {
  t.same(of('error'), [], 'no error record');
  t.equal(run.exit, 0, 'lab program exit status');
  t.equal(of('done').length, 1, 'done record');
  t.equal(one('probe')['supported'], true, "tether's soft-dirty probe passes on Debian's kernel");
});

t.test('epochs of known writes: soft-dirty and scan report exactly the written pages', async (t) => {
  for (const name of ['epochs', 'thp']) {
    const recs = of(name).filter((r) => r['epoch'] !== undefined);
    t.equal(recs.length, 8, `${name}: 8 epochs`);
    for (const r of recs) {
      const what = `${name} epoch ${String(r['epoch'])} (${String(r['written'])} written)`;
      t.equal(r['missedSoftDirty'], 0, `${what}: soft-dirty missed none`);
      t.equal(r['extraSoftDirty'], 0, `${what}: soft-dirty reported no unwritten page`);
      t.equal(r['missedScan'], 0, `${what}: scan missed none`);
      t.equal(r['extraScan'], 0, `${what}: scan reported no unwritten page`);
      t.ok(Number(r['softDirtyCandidates']) >= Number(r['written']), `${what}: candidates cover the writes`);
    }
  }
  // The THP case really ran on huge pages: PMD-mapped, a 4 KiB write marks its whole 2 MiB.
  const thp = of('thp').filter((r) => r['epoch'] !== undefined);
  t.ok(
    thp.every((r) => parseInt(String(r['shmemPmdMapped']), 10) > 0),
    'the THP mapping is PMD-mapped in every epoch',
  );
  t.equal(thp.find((r) => r['written'] === 1)?.['softDirtyCandidates'], 512, 'one written 4 KiB page: 512 candidates (its huge page)');
});

t.test('clear_refs racing writes', async (t) => {
  const paused = one('race-paused');
  t.equal(paused['writes'], 4096, 'every page written once during the collects');
  t.equal(paused['lost'], 0, 'collects with the writer stopped (as tether pauses the VM): no write lost');
  const unpaused = one('race-unpaused');
  t.comment(
    `collects racing the writer (not how tether runs): ${String(unpaused['lost'])} of ${String(unpaused['writes'])} writes lost over ${String(unpaused['rounds'])} collects`,
  );
});

t.test('reclaim: a written page swapped out and faulted back by a read loses its soft-dirty bit', async (t) => {
  const r = one('reclaim');
  t.equal(r['incoreAfterReclaim'], 0, 'the page really left memory (memory.reclaim to the swap disk)');
  t.equal(r['readBackOk'], true, "the read brings back the epoch's write");
  t.same(r['missedScan'], [], 'scan finds it');
  t.same(r['missedSoftDirty'], [1234], 'soft-dirty (precondition skipped) misses it: why tether refuses');
  const m = one('reclaim-mlocked');
  t.equal(m['incoreAfterReclaim'], 1, 'mlocked: the page stays in memory');
  t.same(m['missedSoftDirty'], [], 'mlocked: soft-dirty misses nothing');
});

t.test('collapse: a written small page collapsed into a THP and read back loses its bit', async (t) => {
  const r = one('collapse');
  t.equal(r['collapseErrno'], 0, 'MADV_COLLAPSE accepted');
  t.same(r['missedScan'], [], 'scan finds it');
  t.same(r['missedSoftDirty'], [700], 'soft-dirty (precondition skipped) misses it: why tether refuses THP-eligible RAM');
});

t.test("tether's preconditions for soft-dirty", async (t) => {
  const pre = of('precondition');
  const find = (path: string, swapOn: boolean, locked: boolean) =>
    pre.find((r) => r['path'] === path && r['swapOn'] === swapOn && r['locked'] === locked);
  const expect = [
    ['/dev/shm/pre', false, false, 'none', 'soft-dirty', 'swap off'],
    ['/dev/shm/pre', false, true, 'none', 'soft-dirty', 'swap off, mlocked'],
    ['/mnt/thp/pre', false, false, 'ERR_MEM_SOFTDIRTY_THP', 'scan', 'a huge=always tmpfs'],
    ['/dev/shm/pre2', true, false, 'ERR_MEM_SOFTDIRTY_RECLAIM', 'scan', 'swap on, not mlocked'],
    ['/dev/shm/pre2', true, true, 'none', 'soft-dirty', 'swap on, mlocked'],
  ] as const;
  for (const [path, swapOn, locked, code, auto, what] of expect) {
    const r = find(path, swapOn, locked);
    t.ok(r, `${what}: record`);
    t.equal(r?.['softDirtyError'], code, `${what}: dirtyTracker soft-dirty -> ${code}`);
    t.equal(r?.['auto'], auto, `${what}: dirtyTracker auto picks ${auto}`);
  }
});
