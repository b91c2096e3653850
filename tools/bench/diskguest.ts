/**
 * In-guest disk benchmark:
 *   npm run bench diskguest [-- --ops 2000 --span-mib 64 --journal-links 1,0 --journal-intervals 50,200 --journal-control
 *                              --journal-guest-mib 512 --only steady,guest,journal,ckpt[,aa] | --quick]
 *   (aa: with guest, plain QEMU once more in every round: the steady-state ratio's A/A reference)
 *
 * Four parts; the last three each in its own two-namespace Cluster (lab/cluster.ts),
 * under real QEMU (TCG) with the tether guest image:
 *
 * 0. steady: QEMU's block layer (`qemu-img bench`, O_DIRECT: -t none) on the node graph tether
 *    gives a VM in steady state (src/qemu/cmdline.ts: raw over a file node) against plain QEMU
 *    on the file (a file node alone), 4 KiB and 64 KiB, read and write, depth 1, on a filled
 *    image; rounds alternate the two and the median counts. Target >= 0.95x.
 * 1. diskbench (tools/guest/diskbench.c) in the guest: 4 KiB O_DIRECT seq/rand write/read
 *    at queue depth 1 (latency) and rand at depth 16 (throughput), then 64 KiB O_DIRECT
 *    sequential write and read at depth 1 (seq64k-*, a quarter of the requests) on /dev/vda, twice in
 *    the same run: the VM as `tether vm start` runs it (steady state: QEMU's own file node,
 *    cache.direct=on, under a raw node and virtio-blk-pci), and plain QEMU opening the same
 *    raw image file itself (Cluster option `disk.direct`: a file blockdev, cache.direct=on, under
 *    the same virtio-blk-pci); `--guest-rounds` (2 quick, else 3) alternating boots of each,
 *    the median run per case. Target >= 0.95x.
 * 2. Journaled: the same diskbench run while the VM is on the destination during post-copy,
 *    its writes taken by the destination's block-write journal (checkpoints seal them, the
 *    source applies them to the image). diskbench waits for a trigger block in the image
 *    (Cluster option disk.benchTrigger); the destination's completion is held (Cluster option
 *    holdCompletion) so the post-copy window stays open whatever the link, one run per
 *    --journal-links value (QEMU max-bandwidth in MiB/s, 0 unlimited; default 1 and 0: a slow
 *    link keeps post-copy faults in the run, an unlimited one leaves the journal and the
 *    checkpoints); the bench writes the
 *    trigger once the destination has sent its first checkpoint, waits for the run to end,
 *    then aborts the migration (rollback: the window is what was measured, not the
 *    completion). The figure is NOT the journal alone: every checkpoint pauses the guest,
 *    and the guest's first touch of a page not yet on the destination is a post-copy page
 *    fault served over the link; the bench prints both (checkpoint pause share of the run,
 *    QEMU's postcopy-requests during it) beside the IOPS, and flags a run the window did
 *    not cover. With --journal-control each journaled run is repeated with the destination's
 *    journal forced write-through (TETHER_FAULTS=journal-write-through): the same window
 *    without the journal, so journaled / write-through is the journal's own cost.
 * 3. Checkpoint bytes per MB of guest writes: diskcheck writes 4 KiB records with O_DIRECT
 *    while the VM migrates (completing). The destination's 'checkpoint sent' log records
 *    carry each checkpoint's DISK payload and extent count and the bytes the guest had
 *    written through the journal up to that barrier; the checkpoint cost is payload +
 *    one DISK frame (header + epoch + offset + MAC) per extent. The same completed
 *    migration gives the detach gap: the destination's 'disk detached at completion'
 *    record (journal write-back wait, blockdev-reopen, whole switch).
 *
 * Target: journaled writes >= 0.5x the raw file (issue 7).
 *
 * Prints figures beside targets and writes bench-results/diskguest.json and .md. TCG makes
 * the guest slow: the ratios are the finding, not the absolute IOPS. Run it under the
 * machine-wide lock: flock /tmp/tether-qemu.lock npm run bench diskguest
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { HEADER_SIZE, MAC_SIZE } from '../../src/peer/codec.ts';
import { Cluster } from '../../lab/cluster.ts';
import { diskbench, triggerDiskbench, waitDiskPasses, type DiskbenchCase } from '../../lab/serial.ts';
import { waitFor } from '../../lab/proc.ts';
import { arg } from './args.ts';
import { markdownTable, type Figure } from './report.ts';
import { FILE_NODE } from '../../src/qemu/cmdline.ts';

const quick = process.argv.includes('--quick');
const ops = arg('ops', quick ? 400 : 2000);
const spanMiB = arg('span-mib', quick ? 16 : 64);
// QEMU max-bandwidth (and max-postcopy-bandwidth) of the journaled runs' migration, one run
// per value (MiB/s; 0: unlimited). The window stays open by construction (the destination's
// completion is held until the run is over), so a fast link is measured too: there every
// journaled write still crosses the link in its checkpoint, but no post-copy fault waits on
// it. A slow link alone would measure the link more than the journal (every held write
// must reach the source before its epoch is released).
const journalLinks = (() => {
  const i = process.argv.indexOf('--journal-links');
  if (i >= 0) return process.argv[i + 1]!.split(',').map(Number);
  if (process.argv.includes('--journal-bw-mib')) return [arg('journal-bw-mib', 1)];
  return quick ? [0] : [1, 0];
})();
// The checkpoint interval (checkpoint.intervalMs) of the journaled runs, one run per value
// and link: every checkpoint pauses the guest for a scan of its RAM (the pause follows the
// guest's RAM size, --journal-guest-mib), so the interval sets the share of the window the
// guest runs at all; 50 ms is the default.
const journalIntervals = (() => {
  const i = process.argv.indexOf('--journal-intervals');
  return i >= 0 ? process.argv[i + 1]!.split(',').map(Number) : [50];
})();
const journalGuestMiB = arg('journal-guest-mib', 0);
// --journal-control: every journaled run once more with the destination's journal forced to
// write through to the image (TETHER_FAULTS=journal-write-through): the same window (the NBD
// path through the sidecar, the checkpoint pauses, post-copy faults) without the journal's
// hold, log and fdatasyncs, so journaled / write-through is what the journal itself costs.
const journalControl = process.argv.includes('--journal-control');
for (const v of journalIntervals) if (!Number.isInteger(v) || v <= 0) throw new Error('--journal-intervals: positive integers (ms)');
const linkName = (mib: number, intervalMs?: number): string =>
  (mib === 0 ? 'unlimited link' : `link ${mib} MiB/s`) + (intervalMs === undefined ? '' : `, interval ${intervalMs} ms`);
const only = process.argv.includes('--only')
  ? process.argv[process.argv.indexOf('--only') + 1]!.split(',')
  : ['steady', 'guest', 'journal', 'ckpt'];
const STEADY_TARGET = 0.95;
const WRITE_TARGET = 0.5;
const DISK_OVERHEAD = HEADER_SIZE + 16 + MAC_SIZE;
const MB = 1e6;

type Rec = Record<string, any>;

function records(file: string, from = 0): Rec[] {
  let text = '';
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const out: Rec[] = [];
  for (const line of text.slice(from).split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      out.push(JSON.parse(line) as Rec);
    } catch {
      /* a partial last line */
    }
  }
  return out;
}

async function guestRun(direct: boolean): Promise<DiskbenchCase[]> {
  const c = new Cluster({ disk: { guest: 'diskbench', direct, mib: spanMiB + 16, benchSpanMiB: spanMiB, benchOps: ops } });
  try {
    await c.up();
    const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
    if (r.code !== 0) throw new Error(`vm start: ${r.stderr}`);
    const log = c.serialLog(c.src);
    await waitFor(() => diskbench(log).done || diskbench(log).error !== undefined, `diskbench done (${log})`, 600_000);
    const rep = diskbench(log);
    if (rep.error) throw new Error(rep.error);
    return rep.cases;
  } finally {
    await c.cleanup();
  }
}

/** Per case (name and depth), the run with the median IOPS. */
function medianCases(runs: DiskbenchCase[][]): DiskbenchCase[] {
  return runs[0]!.map((c0) => {
    const all = runs
      .map((r) => r.find((x) => x.case === c0.case && x.qd === c0.qd))
      .filter((x): x is DiskbenchCase => x !== undefined)
      .sort((a, b) => a.iops - b.iops);
    return all[(all.length - 1) >> 1]!;
  });
}

interface SteadyCase {
  case: string;
  plainIops: number;
  tetherIops: number;
  ratio: number;
}

/**
 * Part 0: `qemu-img bench` -t none (O_DIRECT) with the node graph of cmdline.ts (raw `disk0`
 * over file `f0`) vs a file node alone, on a filled image under the bench directory.
 */
function steadyRun(): SteadyCase[] {
  const dir = fs.mkdtempSync(path.join(fs.existsSync('/var/tmp') ? '/var/tmp' : os.tmpdir(), 'tether-steady-'));
  try {
    const img = path.join(dir, 'disk.img');
    const mib = quick ? 32 : 128;
    execFileSync('dd', ['if=/dev/urandom', `of=${img}`, 'bs=1M', `count=${mib}`, 'status=none']);
    const plain = `driver=file,filename=${img},cache.direct=on`;
    const tether = `driver=raw,node-name=disk0,file.driver=file,file.node-name=${FILE_NODE},file.filename=${img},file.cache.direct=on`;
    const rounds = quick ? 3 : 5;
    const out: SteadyCase[] = [];
    for (const size of [4096, 65536]) {
      for (const write of [false, true]) {
        const count = Math.min(Math.floor((mib * 1024 * 1024) / size), quick ? 2000 : 8000);
        const bench = (spec: string): number => {
          const args = [
            'bench',
            '--image-opts',
            '-t',
            'none',
            '-c',
            String(count),
            '-d',
            '1',
            '-s',
            String(size),
            ...(write ? ['-w', '--pattern=90'] : []),
            spec,
          ];
          const m = /Run completed in ([\d.]+) seconds/.exec(execFileSync('qemu-img', args, { encoding: 'utf8' }));
          if (!m) throw new Error('unexpected qemu-img bench output');
          return count / Number(m[1]);
        };
        const p: number[] = [];
        const t: number[] = [];
        for (let r = 0; r < rounds; r++) {
          p.push(bench(plain));
          t.push(bench(tether));
        }
        const med = (a: number[]) => a.sort((x, y) => x - y)[a.length >> 1]!;
        const plainIops = Math.round(med(p));
        const tetherIops = Math.round(med(t));
        out.push({ case: `${size / 1024} KiB ${write ? 'write' : 'read'} qd1`, plainIops, tetherIops, ratio: tetherIops / plainIops });
      }
    }
    return out;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

interface Journaled {
  cases: DiskbenchCase[];
  /** Trigger written -> 'diskbench done' seen (100 ms polls), ms. */
  runMs: number;
  /** Checkpoints the destination sent during the run, their pauses (VM stopped) summed. */
  checkpoints: number;
  pauseMs: number;
  /** Bytes the guest wrote through the journal between the checkpoints around the run. */
  journaledBytes: number;
  /** QEMU's postcopy-requests (pages the destination faulted on) during the run; null if not reported. */
  postcopyRequests: number | null;
  /** Migration phase on the source before and after the run; open = post-copy throughout. */
  phaseBefore: string;
  phaseAfter: string;
  windowOpen: boolean;
  ramRemainingAfter: number | null;
  outcome: string;
}

function fileSize(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0;
  }
}

async function journaledRun(bwMiB: number, intervalMs: number, writeThrough = false): Promise<Journaled> {
  const c = new Cluster({
    ...(writeThrough ? { faults: { destination: 'journal-write-through' } } : {}),
    disk: { guest: 'diskbench', mib: spanMiB + 16, benchSpanMiB: spanMiB, benchOps: ops, benchTrigger: true },
    vm: {
      maxBandwidth: Math.round(bwMiB * 1024 * 1024),
      intervalMs,
      ...(journalGuestMiB > 0 ? { memoryMiB: journalGuestMiB } : {}),
    },
    // the window cannot close before the run ends, whatever the link
    holdCompletion: true,
  });
  try {
    await c.up();
    const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
    if (r.code !== 0) throw new Error(`vm start: ${r.stderr}`);
    const srcLog = c.serialLog(c.src);
    const waiting = () => fs.existsSync(srcLog) && fs.readFileSync(srcLog, 'utf8').includes('diskbench waiting for the trigger');
    await waitFor(() => waiting() || diskbench(srcLog).error !== undefined, `diskbench waiting (${srcLog})`, 300_000);
    if (diskbench(srcLog).error) throw new Error(diskbench(srcLog).error);
    const dstFrom = fileSize(c.dst.daemonLog);
    let ended = false;
    const tMig = Date.now();
    const migrating = c.migrate().finally(() => {
      ended = true;
    });
    const sent = () => records(c.dst.daemonLog, dstFrom).filter((x) => x.msg === 'checkpoint sent' && typeof x.pauseMs === 'number');
    // The destination's epoch loop seals its first checkpoint once the guest runs there.
    await waitFor(() => sent().length > 0 || ended, 'the first checkpoint on the destination', 300_000);
    if (ended) throw new Error(`the migration ended before the guest ran on the destination: ${(await migrating).stderr.slice(-1500)}`);
    const before = ((await c.status(c.src)).migration ?? {}) as Rec;
    const t0 = Date.now();
    triggerDiskbench(c.diskImage);
    const dstLog = c.serialLog(c.dst);
    await waitFor(() => diskbench(dstLog).done || diskbench(dstLog).error !== undefined, `diskbench done (${dstLog})`, 600_000);
    const t1 = Date.now();
    const endedDuringRun = ended;
    const after = ((await c.status(c.src)).migration ?? {}) as Rec;
    const rep = diskbench(dstLog);
    if (rep.error) throw new Error(rep.error);
    if (!ended) {
      // The window is what was measured; rolling back ends the slow migration at once.
      const a = await c.tether(c.src, ['abort', c.vmName]);
      if (a.code !== 0) console.log(`abort: ${a.stderr}`);
    }
    // a rollback takes seconds; should the abort not take, cleanup ends the slow migration
    const mig = await Promise.race([
      migrating,
      new Promise<Awaited<typeof migrating>>((resolve) =>
        setTimeout(
          () => resolve({ code: null, result: { outcome: 'still migrating 60 s after the abort' }, stderr: '', progress: [] }),
          60_000,
        ).unref(),
      ),
    ]);
    const all = sent();
    const at = (x: Rec) => Date.parse(String(x.t));
    const during = all.filter((x) => at(x) >= t0 && at(x) <= t1);
    const lastBefore = all.filter((x) => at(x) < t0).pop();
    const disk = (x: Rec | undefined) => (typeof x?.guestDiskBytes === 'number' ? (x.guestDiskBytes as number) : 0);
    // source progress records: t in ms since the migration started (≈ tMig)
    const ram = (until: number) => mig.progress.filter((p) => p.ram && tMig + Number(p.t) <= until).pop()?.ram as Rec | undefined;
    const r0 = ram(t0)?.postcopyRequests as number | undefined;
    const r1 = ram(t1)?.postcopyRequests as number | undefined;
    const remaining = ram(t1)?.remaining as number | undefined;
    return {
      cases: rep.cases,
      runMs: t1 - t0,
      checkpoints: during.length,
      pauseMs: during.reduce((n, x) => n + Number(x.pauseMs), 0),
      journaledBytes: disk(during[during.length - 1]) - disk(lastBefore),
      postcopyRequests: r1 === undefined ? null : r1 - (r0 ?? 0),
      phaseBefore: String(before.phase ?? before.state ?? '?'),
      phaseAfter: String(after.phase ?? after.state ?? '?'),
      windowOpen: !endedDuringRun && before.phase === 'postcopy' && after.phase === 'postcopy',
      ramRemainingAfter: remaining ?? null,
      outcome: String(mig.result?.outcome ?? `exit ${mig.code}`),
    };
  } finally {
    await c.cleanup();
  }
}

interface Ckpt {
  checkpoints: number;
  diskBytes: number;
  diskExtents: number;
  guestDiskBytes: number;
  ckptBytesPerMB: number;
  outcome: string;
  /** The destination's switch to its file node at completion (null: no record). */
  detach: { drainMs: number; reopenMs: number; totalMs: number } | null;
}

async function ckptRun(): Promise<Ckpt> {
  const c = new Cluster({ disk: { guest: 'diskcheck' } });
  try {
    await c.up();
    const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
    if (r.code !== 0) throw new Error(`vm start: ${r.stderr}`);
    await waitDiskPasses(c.serialLog(c.src), 0, 2, 'on the source before migrating');
    const mig = await c.migrate();
    const sent = records(c.dst.daemonLog).filter((x) => x.msg === 'checkpoint sent' && typeof x.diskBytes === 'number');
    const diskBytes = sent.reduce((n, x) => n + x.diskBytes, 0);
    const diskExtents = sent.reduce((n, x) => n + x.diskExtents, 0);
    const guestDiskBytes = Math.max(0, ...sent.map((x) => x.guestDiskBytes as number));
    // the switch follows the source's answer, which `migrate` does not wait for
    const detached = () => records(c.dst.daemonLog).find((x) => x.msg === 'disk detached at completion');
    await waitFor(() => detached() !== undefined, 'the disk switch on the destination', 60_000).catch((e: Error) =>
      console.error(`${e.message}: the switch figures are left out`),
    );
    const d = detached();
    return {
      detach: d ? { drainMs: Number(d.drainMs), reopenMs: Number(d.reopenMs), totalMs: Number(d.totalMs) } : null,
      checkpoints: sent.length,
      diskBytes,
      diskExtents,
      guestDiskBytes,
      ckptBytesPerMB: guestDiskBytes > 0 ? (diskBytes + diskExtents * DISK_OVERHEAD) / (guestDiskBytes / MB) : NaN,
      outcome: String(mig.result?.outcome ?? `exit ${mig.code}`),
    };
  } finally {
    await c.cleanup();
  }
}

const figures: Figure[] = [];
const result: Rec = {
  bench: 'diskguest',
  date: new Date().toISOString(),
  host: { cpus: os.cpus().length, kernel: os.release() },
  quick,
  ops,
  spanMiB,
};
if (only.includes('steady')) {
  const st = steadyRun();
  result.steady = st;
  console.log('qemu-img bench -t none (O_DIRECT), depth 1: tether steady state (raw over file) vs plain QEMU (file)');
  for (const x of st) {
    console.log(
      `${x.case.padEnd(18)} plain ${String(x.plainIops).padStart(7)}  tether ${String(x.tetherIops).padStart(7)}  ${x.ratio.toFixed(2)} x`,
    );
    figures.push({
      name: `qemu-img ${x.case} tether steady state / plain QEMU file`,
      value: x.ratio,
      unit: 'x',
      target: { op: '>=' as const, value: STEADY_TARGET },
      note: `${x.tetherIops} vs ${x.plainIops} IOPS (median of alternating rounds)`,
    });
  }
}
if (only.includes('guest') || only.includes('journal')) {
  // the journaled ratio needs the file baseline of the same run
  // Rounds alternate plain QEMU and tether (a boot each), and each case takes its median:
  // the two are the same QEMU I/O path, so what differs between single runs is host load.
  const rounds = arg('guest-rounds', quick ? 2 : 3);
  const plainRuns: DiskbenchCase[][] = [];
  const tetherRuns: DiskbenchCase[][] = [];
  // --only …,aa: plain QEMU a second time in every round, the steady-state ratio's A/A reference
  const aaRuns: DiskbenchCase[][] = [];
  for (let r = 0; r < rounds; r++) {
    plainRuns.push(await guestRun(true));
    if (only.includes('guest')) tetherRuns.push(await guestRun(false));
    if (only.includes('aa')) aaRuns.push(await guestRun(true));
  }
  const file = medianCases(plainRuns);
  const aa = aaRuns.length ? medianCases(aaRuns) : [];
  const nbd = only.includes('guest') ? medianCases(tetherRuns) : [];
  const jrs: { bwMiB: number; intervalMs: number; jr: Journaled; wt?: Journaled }[] = [];
  if (only.includes('journal'))
    for (const bwMiB of journalLinks)
      for (const intervalMs of journalIntervals) {
        const jr = await journaledRun(bwMiB, intervalMs);
        jrs.push({ bwMiB, intervalMs, jr, ...(journalControl ? { wt: await journaledRun(bwMiB, intervalMs, true) } : {}) });
      }
  result.guest = { nbd, file, ...(aa.length ? { aa } : {}), ...(jrs.length ? { journaled: jrs } : {}) };
  const col = (v: string | number, w: number) => String(v).padStart(w);
  const jname = (bwMiB: number, intervalMs: number) => `j@${bwMiB === 0 ? 'max' : `${bwMiB}M`}/${intervalMs}`;
  console.log(
    `diskbench in the guest (TCG), 4 KiB O_DIRECT (seq64k-*: 64 KiB, ${Math.floor(ops / 4)} requests), ${ops} requests per case over ${spanMiB} MiB`,
  );
  console.log(
    `${'case'.padEnd(16)}${col('file', 7)}${col('tthr', 7)}${col('tthr/file', 10)}` +
      jrs.map(({ bwMiB, intervalMs }) => `${col(jname(bwMiB, intervalMs), 11)}${col('/file', 7)}`).join('') +
      '   lat mean/p99 µs: file | tether' +
      jrs.map(({ bwMiB, intervalMs }) => ` | ${jname(bwMiB, intervalMs)}`).join(''),
  );
  for (const f of file) {
    const n = nbd.find((x) => x.case === f.case && x.qd === f.qd);
    const js = jrs.map(({ jr }) => jr.cases.find((x) => x.case === f.case && x.qd === f.qd));
    const name = `${f.case} qd${f.qd}`;
    const lat = (x: DiskbenchCase | undefined) => (x ? `${x.latMeanUs}/${x.latP99Us}` : '-');
    console.log(
      `${name.padEnd(16)}${col(f.iops, 7)}${col(n?.iops ?? '-', 7)}${col(n ? (n.iops / f.iops).toFixed(2) : '-', 10)}` +
        js.map((j) => `${col(j?.iops ?? '-', 11)}${col(j ? (j.iops / f.iops).toFixed(2) : '-', 7)}`).join('') +
        `   ${lat(f)} | ${lat(n)}` +
        js.map((j) => ` | ${lat(j)}`).join(''),
    );
    const a = aa.find((x) => x.case === f.case && x.qd === f.qd);
    if (a) {
      console.log(`${''.padEnd(16)}A/A: plain QEMU again ${a.iops} IOPS, ${(a.iops / f.iops).toFixed(2)} x`);
      figures.push({
        name: `guest ${name} plain QEMU file again / plain QEMU file (A/A: the identical path twice)`,
        value: a.iops / f.iops,
        unit: 'x',
        target: { op: '>=' as const, value: STEADY_TARGET },
        note: `${a.iops} vs ${f.iops} IOPS: what this machine's noise does to the steady-state ratio`,
      });
    }
    if (n) {
      figures.push({
        name: `guest ${name} tether steady state / plain QEMU file`,
        value: n.iops / f.iops,
        unit: 'x',
        target: { op: '>=' as const, value: STEADY_TARGET },
        note: `${n.iops} vs ${f.iops} IOPS; latency mean ${n.latMeanUs} vs ${f.latMeanUs} µs, p99 ${n.latP99Us} vs ${f.latP99Us} µs`,
      });
    }
    jrs.forEach(({ bwMiB, intervalMs, jr, wt }, k) => {
      const j = js[k];
      if (!j) return;
      const write = f.case.endsWith('write');
      const w = wt?.cases.find((x) => x.case === f.case && x.qd === f.qd);
      if (wt && w) {
        const open = jr.windowOpen && wt.windowOpen;
        figures.push({
          name: `guest ${name} same window, journal forced write-through (${linkName(bwMiB, intervalMs)}) / file`,
          value: wt.windowOpen ? w.iops / f.iops : null,
          unit: 'x',
          note: `${w.iops} IOPS; guest paused ${wt.runMs > 0 ? ((100 * wt.pauseMs) / wt.runMs).toFixed(0) : '-'} % of the run: the window without the journal`,
        });
        figures.push({
          name: `guest ${name} journaled / journal forced write-through (${linkName(bwMiB, intervalMs)})`,
          value: open ? j.iops / w.iops : null,
          unit: 'x',
          note: 'what the journal itself costs in the window (its hold, log and fdatasyncs)',
        });
      }
      figures.push({
        name: `guest ${name} NBD journaled (post-copy window, ${linkName(bwMiB, intervalMs)}) / file`,
        value: jr.windowOpen ? j.iops / f.iops : null,
        unit: 'x',
        ...(write ? { target: { op: '>=' as const, value: WRITE_TARGET } } : {}),
        note:
          `${j.iops} vs ${f.iops} IOPS; latency mean ${j.latMeanUs} vs ${f.latMeanUs} µs, p99 ${j.latP99Us} vs ${f.latP99Us} µs` +
          (jr.windowOpen ? '' : `; WINDOW CLOSED during the run: ${(j.iops / f.iops).toFixed(2)} x not journaled throughout`),
      });
    });
  }
  for (const { bwMiB, intervalMs, jr } of jrs) {
    const pct = jr.runMs > 0 ? ((100 * jr.pauseMs) / jr.runMs).toFixed(0) : '-';
    console.log(
      `
${jname(bwMiB, intervalMs)} = the same run on the destination inside the post-copy window (${linkName(bwMiB, intervalMs)}, completion held until the run ended, ` +
        `phase ${jr.phaseBefore} -> ${jr.phaseAfter}${jr.windowOpen ? ', window open throughout' : ', WINDOW CLOSED during the run'}; ` +
        `migration then ${jr.outcome}).
` +
        `NOT the journal alone: in the ${(jr.runMs / 1000).toFixed(1)} s run the destination took ${jr.checkpoints} checkpoints ` +
        `(guest paused ${(jr.pauseMs / 1000).toFixed(2)} s, ${pct} % of the run) and QEMU served ` +
        `${jr.postcopyRequests ?? '?'} post-copy page requests (guest page faults on pages not yet moved)` +
        `${jr.ramRemainingAfter !== null ? `; ${(jr.ramRemainingAfter / 2 ** 20).toFixed(0)} MiB of RAM still to move at the end` : ''}. ` +
        `${(jr.journaledBytes / MB).toFixed(1)} MB went through the journal between the checkpoints around the run.`,
    );
    figures.push({
      name: `guest time paused by checkpoints in the journaled run (${linkName(bwMiB, intervalMs)})`,
      value: jr.runMs > 0 ? (100 * jr.pauseMs) / jr.runMs : null,
      unit: '%',
      note: `${jr.checkpoints} checkpoints in ${(jr.runMs / 1000).toFixed(1)} s; ${jr.postcopyRequests ?? '?'} post-copy page requests in the same time`,
    });
  }
}
if (only.includes('ckpt')) {
  const k = await ckptRun();
  result.ckpt = k;
  console.log(
    `\nmigration (${k.outcome}) with diskcheck writing: ${k.checkpoints} checkpoints, ${(k.guestDiskBytes / MB).toFixed(2)} MB written by the guest through the journal, ${(k.diskBytes / MB).toFixed(2)} MB DISK payload in ${k.diskExtents} extents`,
  );
  figures.push({
    name: 'checkpoint bytes per MB of guest writes',
    value: k.ckptBytesPerMB / 1e3,
    unit: 'kB',
    note: `${k.checkpoints} checkpoints; payload + ${DISK_OVERHEAD} B per extent; overwrites within an epoch are sent once`,
  });
  if (k.detach) {
    console.log(
      `detach at completion: journal write-back wait ${k.detach.drainMs} ms, blockdev-reopen ${k.detach.reopenMs} ms (guest I/O held), whole switch ${k.detach.totalMs} ms`,
    );
  }
  figures.push({
    name: 'disk detach gap at completion (blockdev-reopen: guest I/O held)',
    value: k.detach?.reopenMs ?? null,
    unit: 'ms',
    note: k.detach
      ? `journal write-back wait ${k.detach.drainMs} ms before it; blockdev-add + reopen + blockdev-del + close ${k.detach.totalMs} ms`
      : 'no detach record on the destination',
  });
}
const table = markdownTable(figures);
console.log('\n' + table);
result.figures = figures;
fs.mkdirSync('bench-results', { recursive: true });
fs.writeFileSync(path.join('bench-results', 'diskguest.json'), JSON.stringify(result, null, 2) + '\n');
fs.writeFileSync(
  path.join('bench-results', 'diskguest.md'),
  `# diskguest bench (${result.date})\n\n\`npm run bench diskguest${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}\`\n\n${table}\n`,
);
console.log('wrote bench-results/diskguest.json and diskguest.md');
