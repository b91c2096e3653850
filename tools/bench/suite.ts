/**
 * Benchmark suite: `npm run bench` (full) and `npm run bench -- --quick` (CI smoke).
 *
 * Strategies side by side, each migration in its own two-namespace Cluster (lab/cluster.ts:
 * real QEMU TCG, a tether daemon per namespace), the migration link veth shaped
 * with tbf in both directions:
 *   vanilla-precopy    QEMU pre-copy, started directly in the namespaces (no tether); guest
 *                      RAM 8 KiB over the stated size (PRECOPY_NOTE: QEMU 7.2 loses TCG dirty bits)
 *   vanilla-postcopy   QEMU post-copy (migrate, then migrate-start-postcopy at once)
 *   tether-25/50/100   tether at that checkpoint interval (ms)
 * Workloads: idle (the guest sleeps), mc25 / mc75 (memcheck over 25 % / 75 % of RAM at
 * --memcheck-rate MB/s), net (netcheck conversation through the gate, the guest otherwise
 * idle; vanilla uses a plain QEMU TAP), disk (diskcheck writes through the journal; tether
 * only: the disk is served by the sidecar).
 *
 * A full factorial is far too slow on a 2-core TCG machine, so the plan (printed into every
 * output) is three parts plus two reused benches:
 *   grid      strategy × link (1gbit, 200mbit) at 512 MiB, mc25, --repeats runs each
 *   ram       vanilla-postcopy vs tether-50 at 1 GiB and 2 GiB, mc25, 1gbit, --ram-repeats
 *   workload  vanilla-postcopy and tether-50 over idle, mc75, net, disk at 512 MiB, 1gbit
 *             (mc25 at 1gbit is in the grid), --workload-repeats
 *   rollback  `bench migrate --only rollback`: repeated interrupted migrations, hot standby
 *             vs a fresh QEMU (restore / detect p50/p99)
 *   micro     `bench gate` and `bench journal` (frame path and journal throughput)
 *
 * Per run: total time, switchover blackout (guest not running: source STOP → destination
 * running, see BLACKOUT_NOTE), QEMU's reported downtime (vanilla), bytes each way on the link,
 * checkpoint pauses split stop/scan/devstate/cont, checkpoint bytes vs truly dirtied bytes
 * (TRULY_DIRTIED_NOTE), guest progress in the post-copy window (memcheck pages/s from the
 * guest's own progress lines, timestamped as they reach the serial log).
 *
 * Output: bench-results/suite-<time>/ (suite.json, runs/*.json one per migration,
 * summary.md, timeline-*.svg per migration, compare-*.svg, logs/), and the latest at
 * bench-results/suite.json and suite.md.
 *
 * Options (defaults; quick in brackets):
 *   --quick                 CI smoke: 256 MiB guest, one run of each strategy, every workload
 *                           and output path once; figures are not meaningful
 *   --parts grid,ram,workload,rollback,micro    run a subset (pieces of a full run)
 *   --dir <path>            add to an earlier run's folder: runs already there are kept
 *   --report-only           with --dir: no measuring, rebuild the report from the runs there
 *   --repeats 3 [1]         runs per grid cell (medians)
 *   --ram-repeats 1         runs per RAM-sweep cell
 *   --workload-repeats 1    runs per workload cell
 *   --memcheck-rate 64      memcheck MB/s (0 = unthrottled)
 *   --precopy-deadline-s 30 [15]  vanilla pre-copy that has not converged by then is cancelled
 *   --rollback-repeats 5    interrupted migrations per standby mode
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../lab/cluster.ts';
import { fileSize, sh, waitFor } from '../../lab/proc.ts';
import { ROOT, type ClusterOptions, type Host } from '../../lab/topology.ts';
import { waitDiskPasses, waitPasses } from '../../lab/serial.ts';
import { type NetClient } from '../../lab/net/driver.ts';
import { loadVmConfig } from '../../src/config/load.ts';
import type { MigrationResult } from '../../src/migrate/result.ts';
import { percentile } from '../../src/util/time.ts';
import {
  copyClusterLogs,
  corruptCheck,
  digestLogs,
  hashFloor,
  killVanilla,
  LINKS,
  log,
  MiB,
  now,
  r2,
  shapeLink,
  startVanillaQemu,
  timelineOf,
  withTimeout,
  type CorruptCheck,
  type HashFloor,
  type Link,
  type LogDigest,
  type Rec,
  type VQemu,
} from './lib.ts';
import { ProgressTail } from './progress.ts';
import { num, str } from './args.ts';
import { barsSpec, markdownTable, timelineSpec, plotDir, type Figure, type TimelineInput } from './report.ts';

// ------------------------------------------------------------------ options

const quick = process.argv.includes('--quick');
/** Only rebuild the report from the runs already in --dir (e.g. after a run was cut short). */
const reportOnly = process.argv.includes('--report-only');
const ALL_PARTS = ['grid', 'ram', 'workload', 'rollback', 'micro'] as const;
type Part = (typeof ALL_PARTS)[number];
const opt = {
  quick,
  parts: new Set(str('parts', ALL_PARTS.join(',')).split(',')) as Set<Part>,
  repeats: num('repeats', quick ? 1 : 3),
  ramRepeats: num('ram-repeats', 1),
  workloadRepeats: num('workload-repeats', 1),
  memcheckRate: num('memcheck-rate', 64),
  precopyDeadlineS: num('precopy-deadline-s', quick ? 15 : 30),
  rollbackRepeats: num('rollback-repeats', quick ? 1 : 5),
};
for (const p of opt.parts) if (!(ALL_PARTS as readonly string[]).includes(p)) throw new Error(`unknown --parts entry ${p}`);

const OUT_DIR = path.join(ROOT, 'bench-results');
const STARTED = new Date().toISOString();
const RUN_DIR = process.argv.includes('--dir')
  ? path.resolve(str('dir', ''))
  : path.join(OUT_DIR, `suite${quick ? '-quick' : ''}-${STARTED.replaceAll(':', '').replace(/\.\d+Z$/, 'Z')}`);
const LOG_DIR = path.join(RUN_DIR, 'logs');
const RUNS_DIR = path.join(RUN_DIR, 'runs');
/** QEMU's max-bandwidth for every strategy: far above both links, so tbf is what limits. */
const UNLIMITED_BW = 10 * 1024 * MiB;
const VANILLA_PORT = 49_200;
/** Deadlines only keep a broken run from hanging; they are not performance limits. */
const MIGRATE_DEADLINE_MS = 600_000;
const GUEST_DEFAULT_MIB = quick ? 256 : 512;

const BLACKOUT_NOTE =
  'switchover blackout = guest not running on either host around switchover. vanilla: QMP STOP event of the source → ' +
  'RESUME event of the destination (QEMU timestamps, same host clock). tether: the same two events, which the sidecars ' +
  'log (qemuStopAt on the source\'s "-> switchover", qemuResumeAt on the destination\'s "-> running"); it includes ' +
  'saving checkpoint 0 (device state, durably) while the source is paused before switchover.';
const TRULY_DIRTIED_NOTE =
  'truly dirtied = per epoch (one checkpoint stop to the next; the first from the destination running), the distinct ' +
  "pages memcheck wrote, from the guest's own progress lines (pass/page position, timestamped as they reach the serial " +
  'log, interpolated linearly), capped at the buffer size; × 4 KiB. Pages the guest kernel dirties are not counted, so the ' +
  'ratio overstates the overhead a little.';
const PRECOPY_NOTE =
  'vanilla pre-copy runs with guest RAM 8 KiB over the stated size. QEMU 7.2 (7.2.22 included) lacks upstream fix ' +
  '03bfc2188f ("physmem: Fix migration dirty bitmap coherency with TCG memory access", QEMU 9.0): when the RAM block ' +
  "is a multiple of 256 KiB, the dirty-bitmap sync's 64-pages-at-a-time path clears the migration dirty bits without " +
  "resetting TCG's TLB, so guest stores through TLB entries cached before the sync are never marked dirty, the " +
  'destination keeps stale pages, and its guest panics (list corruption) right after a pre-copy completes. With the ' +
  'odd size QEMU takes its per-page path, which resets the TLB for each dirty page: correct, but a sync costs more ' +
  "than in a fixed QEMU, so vanilla pre-copy's figures are a little pessimistic. Vanilla post-copy calls " +
  'migrate-start-postcopy at once; tether under TCG also holds max-bandwidth to a trickle until the switchover, so ' +
  'no RAM page leaves before the stop (its source logs precopyBytes: 0), and pages sent after the stop carry their ' +
  'final content.';
/** See PRECOPY_NOTE: RAM 8 KiB (-m rounds up to 8 KiB) over a multiple of QEMU's 256 KiB fast-sync chunk. */
const PRECOPY_RAM_PAD_MIB = 8 / 1024;
const PROGRESS_NOTE =
  'guest progress = memcheck pages written per second in the post-copy window (destination running → migration ' +
  "completed), from the guest's progress lines (4 per pass) interpolated linearly at the window's ends.";

// ------------------------------------------------------------------ the plan

type Strategy = 'vanilla-precopy' | 'vanilla-postcopy' | 'tether-25' | 'tether-50' | 'tether-100';
type Workload = 'idle' | 'mc25' | 'mc75' | 'net' | 'disk';
const STRATEGIES: Strategy[] = ['vanilla-precopy', 'vanilla-postcopy', 'tether-25', 'tether-50', 'tether-100'];

interface Cell {
  part: Part;
  strategy: Strategy;
  workload: Workload;
  ramMiB: number;
  link: Link;
  repeats: number;
}
const cellKey = (c: Omit<Cell, 'part' | 'repeats'>): string => `${c.strategy}_${c.workload}_${c.ramMiB}M_${c.link}`;

function plan(parts: Set<Part>): Cell[] {
  const cells: Cell[] = [];
  const add = (part: Part, strategy: Strategy, workload: Workload, ramMiB: number, link: Link, repeats: number) => {
    const k = cellKey({ strategy, workload, ramMiB, link });
    if (!cells.some((c) => cellKey(c) === k)) cells.push({ part, strategy, workload, ramMiB, link, repeats });
  };
  if (quick) {
    // Every strategy, workload and output path once: not meaningful figures.
    add('grid', 'vanilla-postcopy', 'mc25', 256, '1gbit', 1);
    add('grid', 'tether-25', 'mc25', 256, '1gbit', 1);
    add('grid', 'vanilla-precopy', 'idle', 256, '200mbit', 1);
    add('workload', 'tether-50', 'net', 256, '1gbit', 1);
    add('workload', 'tether-100', 'disk', 256, '1gbit', 1);
    return cells;
  }
  if (opt.parts.has('grid'))
    for (const link of ['1gbit', '200mbit'] as Link[]) for (const s of STRATEGIES) add('grid', s, 'mc25', 512, link, opt.repeats);
  if (parts.has('ram'))
    for (const ram of [1024, 2048])
      for (const s of ['vanilla-postcopy', 'tether-50'] as Strategy[]) add('ram', s, 'mc25', ram, '1gbit', opt.ramRepeats);
  if (parts.has('workload'))
    for (const w of ['idle', 'mc75', 'net', 'disk'] as Workload[])
      for (const s of ['vanilla-postcopy', 'tether-50'] as Strategy[]) {
        if (w === 'disk' && s.startsWith('vanilla')) continue;
        add('workload', s, w, 512, '1gbit', opt.workloadRepeats);
      }
  return cells;
}

function planText(cells: Cell[], parts: Set<Part>): string[] {
  const L = [
    `guest RAM ${quick ? '256 MiB (quick)' : '512 MiB unless stated'}; memcheck at ${opt.memcheckRate || 'unthrottled'} MB/s; ` +
      `QEMU max-bandwidth ${UNLIMITED_BW / MiB} MiB/s (tbf limits); vanilla pre-copy cancelled if not converged in ${opt.precopyDeadlineS} s`,
  ];
  for (const c of cells) L.push(`${c.part.padEnd(9)} ${cellKey(c).padEnd(40)} × ${c.repeats}`);
  if (opt.parts.has('rollback'))
    L.push(`rollback  bench migrate --only rollback, ${opt.rollbackRepeats} interrupts per standby mode${quick ? ' (hot only)' : ''}`);
  if (parts.has('micro') && !quick) L.push('micro     bench gate, bench journal (their JSON is read back)');
  return L;
}

// ------------------------------------------------------------------ observation helpers

/** Scrapes the destination's gate gauges every 100 ms from inside its namespace. */
class HeldScraper {
  readonly samples: { t: number; held: number; released: number }[] = [];
  #proc;
  constructor(h: Host) {
    const js = `setInterval(() => fetch('http://${h.addr}:9700/metrics').then((r) => r.text()).then((x) => {
      let held = 0, released = 0;
      for (const l of x.split('\\n')) {
        if (l.startsWith('tether_gate_held_frames{')) held += Number(l.split(' ').pop());
        if (l.startsWith('tether_gate_frames_total{') && l.includes('action="released"')) released += Number(l.split(' ').pop());
      }
      process.stdout.write(JSON.stringify({ t: Date.now(), held, released }) + '\\n');
    }).catch(() => { /* the sidecar restarting: no sample this tick */ }), 100);`;
    this.#proc = spawn('ip', ['netns', 'exec', h.ns, process.execPath, '-e', js], { stdio: ['ignore', 'pipe', 'ignore'] });
    let buf = '';
    this.#proc.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        try {
          this.samples.push(JSON.parse(buf.slice(0, nl)));
        } catch {
          /* partial */
        }
        buf = buf.slice(nl + 1);
      }
    });
  }
  stop(): void {
    this.#proc.kill('SIGKILL');
  }
}

/** Bytes the source's end of the migration link sent (forward) and received (back). */
function linkBytes(c: Cluster): { fwd: number; back: number } {
  const j = JSON.parse(sh('ip', ['-n', c.src.ns, '-j', '-s', 'link', 'show', 'dev', `${c.id}a`])) as Rec[];
  const st = j[0]?.stats64 ?? {};
  return { fwd: Number(st.tx?.bytes ?? 0), back: Number(st.rx?.bytes ?? 0) };
}

function clusterOpts(cell: Cell, vanilla: boolean): ClusterOptions {
  const memcheckMiB = cell.workload === 'mc25' ? cell.ramMiB / 4 : cell.workload === 'mc75' ? (cell.ramMiB * 3) / 4 : 16;
  const interval = cell.strategy.startsWith('tether-') ? Number(cell.strategy.slice(7)) : 50;
  const o: ClusterOptions = {
    vm: {
      memcheckMiB,
      memcheckMBps: opt.memcheckRate,
      intervalMs: interval,
      maxBandwidth: UNLIMITED_BW,
      memoryMiB: cell.ramMiB,
      hotStandby: true,
      // idle and net: the guest only sleeps (net: beside netcheck); the last tether.run wins
      ...(cell.workload === 'idle' || cell.workload === 'net' ? { appendExtra: 'tether.run=sleep:1000000' } : {}),
    },
  };
  if (cell.workload === 'net') o.guestNet = vanilla ? 'qemu-tap' : 'gate';
  if (cell.workload === 'disk') o.disk = { guest: 'diskcheck', mib: 64, blocks: 4096, writesPerPass: 256, delayMs: 1 };
  return o;
}

function isMemcheck(w: Workload): boolean {
  return w === 'mc25' || w === 'mc75';
}

/** The workload is up and past its first round (memcheck: one full pass over its buffer). */
async function workloadReady(c: Cluster, cell: Cell, serial: string): Promise<NetClient | undefined> {
  if (isMemcheck(cell.workload)) {
    // fail fast if the guest's program died (e.g. its buffer does not fit the guest)
    await waitFor(() => {
      const text = readText(serial);
      const dead = /(memcheck: .*|command exited rc=\d+|Out of memory.*)/.exec(text);
      if (dead) throw new Error(`memcheck did not run: ${dead[1]}`);
      return /memcheck pass 1 /.test(text);
    }, `memcheck's first pass (${serial})`);
    const r = await waitPasses(serial, 0, 1, 'before migrating');
    if (r.corrupt.length) throw new Error(`memcheck CORRUPT before migrating: ${r.corrupt[0]}`);
  } else if (cell.workload === 'disk') {
    const r = await waitDiskPasses(serial, 0, 1, 'before migrating');
    if (r.mismatch.length) throw new Error(`diskcheck before migrating: ${r.mismatch[0]}`);
  } else {
    await waitFor(() => /tether-init: run: sleep/.test(readText(serial)), 'the guest up', 120_000);
  }
  if (cell.workload === 'net') {
    const cl = c.netclient({ intervalMs: 20 });
    await cl.waitAnswers(5, 'before migrating', 0, 120_000);
    return cl;
  }
  return undefined;
}

/** The workload made progress on the destination after the migration. */
async function workloadAfter(cell: Cell, serial: string, from: number, client?: NetClient): Promise<void> {
  // A guest that died on the destination makes no progress: say so at once instead of timing out.
  const watch = setInterval(() => {
    const panic = /Kernel panic[^\n]*/.exec(readText(serial));
    if (panic) died = panic[0];
  }, 500);
  let died: string | null = null;
  try {
    // Promise.race below listens to its rejection; once the race is over, 'stop' ends the
    // watcher without one.
    const panicked = waitFor(() => died !== null, 'a guest panic', 3_600_000).then(() => {
      if (died !== 'stop') throw new Error(`the guest died on the destination: ${died}`);
    });
    await Promise.race([workloadAfterInner(cell, serial, from, client), panicked]);
  } finally {
    clearInterval(watch);
    died ??= 'stop'; // ends the panic watcher's waitFor
  }
}

async function workloadAfterInner(cell: Cell, serial: string, from: number, client?: NetClient): Promise<void> {
  if (isMemcheck(cell.workload)) await waitPasses(serial, from, 1, 'on the destination after the migration');
  else if (cell.workload === 'disk') await waitDiskPasses(serial, from, 1, 'on the destination after the migration');
  if (client) await client.waitAnswers(5, 'after the migration', Date.now(), 60_000);
}

function readText(file: string): string {
  try {
    return fs.readFileSync(file, 'latin1');
  } catch {
    return '';
  }
}

function keepLogs(c: Cluster, label: string): void {
  const dir = path.join(LOG_DIR, label);
  fs.mkdirSync(dir, { recursive: true });
  // vanilla QEMUs keep their files under the cluster dir (a short path: the QMP socket's must stay < 108 bytes)
  for (const side of ['src', 'dst']) {
    for (const f of ['serial.log', 'qemu.log']) {
      try {
        fs.copyFileSync(path.join(c.dir, 'vanilla', side, f), path.join(dir, `vanilla-${side}-${f}`));
      } catch {
        /* not a vanilla run */
      }
    }
  }
  copyClusterLogs(c, dir);
}

// ------------------------------------------------------------------ one migration

interface PauseSplit {
  stop: number;
  scan: number;
  devstate: number;
  cont: number;
  total: number;
}

interface Run {
  key: string;
  cell: Cell;
  repeat: number;
  ok: boolean;
  outcome: string;
  error?: string;
  bootMs: number;
  /** Request → completed; vanilla includes the destination QEMU's start and setup, as tether's does. */
  totalMs: number | null;
  /** Migration start → the guest runs on the destination. */
  switchoverMs: number | null;
  blackoutMs: number | null;
  /** QEMU's own query-migrate downtime (vanilla). */
  qemuDowntimeMs: number | null;
  /** Bytes on the migration link: source → destination and back (all traffic: QEMU stream, peer channel). */
  linkBytes: { fwd: number; back: number } | null;
  /** QEMU's ram.transferred (vanilla: final stats; tether: last progress record). */
  ramTransferred: number | null;
  checkpoints: number;
  checkpointBytes: number | null;
  checkpointPages: number | null;
  /** Per checkpoint (tether), ms. */
  pauses: PauseSplit[];
  trulyDirtiedBytes: number | null;
  postcopyWindowMs: number | null;
  /** memcheck pages/s in the post-copy window, and undisturbed before the migration. */
  guestRate: number | null;
  baselineRate: number | null;
  heldMax: number | null;
  net: { answers: number; violations: number } | null;
  memcheck: CorruptCheck[];
  timeline?: TimelineInput;
  digestWarnings?: Record<string, number>;
}

function emptyRun(cell: Cell, repeat: number): Run {
  return {
    key: cellKey(cell),
    cell,
    repeat,
    ok: false,
    outcome: 'error',
    bootMs: 0,
    totalMs: null,
    switchoverMs: null,
    blackoutMs: null,
    qemuDowntimeMs: null,
    linkBytes: null,
    ramTransferred: null,
    checkpoints: 0,
    checkpointBytes: null,
    checkpointPages: null,
    pauses: [],
    trulyDirtiedBytes: null,
    postcopyWindowMs: null,
    guestRate: null,
    baselineRate: null,
    heldMax: null,
    net: null,
    memcheck: [],
  };
}

function phaseAt(d: LogDigest, host: string, suffix: string): number | null {
  return d.phases.find((p) => p.host === host && p.msg.endsWith(suffix))?.atMs ?? null;
}

async function runTether(cell: Cell, repeat: number): Promise<Run> {
  const run = emptyRun(cell, repeat);
  const label = `${run.key}-r${repeat}`;
  const c = new Cluster(clusterOpts(cell, false));
  const tail = new ProgressTail();
  let scraper: HeldScraper | undefined;
  let client: NetClient | undefined;
  try {
    const tb = now();
    await c.up();
    shapeLink(c, cell.link);
    const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
    if (r.code !== 0) throw new Error(`tether vm start failed: ${r.stderr}`);
    tail.watch(c.serialLog(c.src));
    tail.watch(c.serialLog(c.dst));
    client = await workloadReady(c, cell, c.serialLog(c.src));
    run.bootMs = r2(now() - tb);
    if (cell.workload === 'net') scraper = new HeldScraper(c.dst);
    const offsets = { src: fileSize(c.src.daemonLog), dst: fileSize(c.dst.daemonLog) };
    const bytes0 = linkBytes(c);
    log(`${label}: migrating`);
    const t0Wall = Date.now();
    const mig = await withTimeout(c.migrate(), MIGRATE_DEADLINE_MS, 'tether migrate');
    const bytes1 = linkBytes(c);
    run.linkBytes = { fwd: bytes1.fwd - bytes0.fwd, back: bytes1.back - bytes0.back };
    const result = mig.result as MigrationResult | null;
    run.outcome = result?.outcome ?? `exit ${mig.code}`;
    if (mig.code !== 0 || !result) throw new Error(`tether migrate exit ${mig.code}: ${mig.stderr.slice(-1500)}`);
    run.totalMs = result.totalMs;
    run.switchoverMs = result.switchoverMs;
    run.checkpoints = result.checkpoints;
    run.checkpointBytes = result.checkpointBytes?.total ?? 0;
    run.ramTransferred = [...mig.progress].reverse().find((p) => p.ram)?.ram?.transferred ?? null;
    log(`${label}: ${result.outcome} in ${result.totalMs} ms`);
    await workloadAfter(cell, c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), client);
    await sleep(300); // the daemons' last log lines
    tail.stop();
    scraper?.stop();
    const d = digestLogs(c, offsets, t0Wall);
    run.digestWarnings = d.warnings;
    const cps = [...d.checkpoints].sort((a, b) => a.epoch - b.epoch);
    run.checkpointPages = cps.reduce((s, x) => s + x.pages, 0);
    run.pauses = cps.map((x) => ({
      stop: x.stopMs,
      scan: r2(x.collectMs - x.stopMs),
      devstate: x.saveMs,
      cont: r2(x.pauseMs - x.collectMs - x.saveMs),
      total: x.pauseMs,
    }));
    const sw = phaseAt(d, 'host-s', '-> switchover');
    const running = phaseAt(d, 'host-d', '-> running');
    const done = phaseAt(d, 'host-s', '-> completed');
    // QEMU's STOP (source) → RESUME (destination) timestamps, as for vanilla; the sidecars'
    // phase log lines (which trail them by a poll or an event delivery) only as a fallback.
    if (d.qemuStopAt !== null && d.qemuResumeAt !== null) run.blackoutMs = r2(d.qemuResumeAt - d.qemuStopAt);
    else if (sw !== null && running !== null) run.blackoutMs = running - sw;
    if (running !== null && done !== null) {
      run.postcopyWindowMs = done - running;
      if (isMemcheck(cell.workload)) {
        run.guestRate = tail.rate(t0Wall + running, t0Wall + done);
        run.baselineRate = tail.baseline(t0Wall);
        // Truly dirtied: memcheck's distinct pages per epoch, epoch k = stop(k-1) .. stop(k).
        const buffer = tail.pages;
        let prev = t0Wall + running;
        let dirtied = 0;
        let known = true;
        for (const x of cps) {
          const stopAt = t0Wall + x.atMs - x.pauseMs - x.sendMs;
          const a = tail.posAt(prev);
          const b = tail.posAt(stopAt);
          if (a === null || b === null) known = false;
          else dirtied += Math.min(Math.max(0, b - a), buffer);
          prev = stopAt;
        }
        run.trulyDirtiedBytes = known ? Math.round(dirtied) * 4096 : null;
      }
    }
    if (scraper) {
      run.heldMax = scraper.samples.reduce((m, s) => Math.max(m, s.held), 0);
    }
    if (client) run.net = { answers: client.answers().length, violations: client.violations.length };
    run.timeline = timelineOf(`${label}: tether`, mig.progress, d, result);
    if (scraper) {
      // aligned like the checkpoints: wall clock since t0Wall, shifted by the same offset timelineOf uses
      const pre = mig.progress.find((p) => p.phase === 'precopy');
      const preWall = d.phases.find((p) => p.host === 'host-s' && p.msg.endsWith('-> precopy'));
      const offset = pre && preWall ? preWall.atMs - Number(pre.t) : 0;
      run.timeline.held = scraper.samples
        .filter((s) => s.t >= t0Wall)
        .map((s) => ({ t: r2((s.t - t0Wall - offset) / 1000), frames: s.held }))
        .filter((s) => s.t <= (result.totalMs + 2000) / 1000);
    }
    run.ok = result.outcome === 'completed';
  } catch (e) {
    run.error = (e as Error).stack ?? String(e);
    log(`${label} failed: ${(e as Error).message}`);
  } finally {
    tail.stop();
    scraper?.stop();
    if (client && !run.net) run.net = { answers: client.answers().length, violations: client.violations.length };
    run.memcheck = [
      corruptCheck(`${label} source serial`, c.serialLog(c.src)),
      corruptCheck(`${label} destination serial`, c.serialLog(c.dst)),
    ];
    keepLogs(c, label);
    await c.cleanup();
  }
  return run;
}

async function runVanilla(cell: Cell, repeat: number): Promise<Run> {
  const run = emptyRun(cell, repeat);
  const label = `${run.key}-r${repeat}`;
  const postcopy = cell.strategy === 'vanilla-postcopy';
  const c = new Cluster(clusterOpts(cell, true));
  const tail = new ProgressTail();
  let src: VQemu | undefined;
  let dst: VQemu | undefined;
  let client: NetClient | undefined;
  try {
    const tb = now();
    await c.up(); // the daemons stay idle: only the namespaces and the VM YAML are used
    shapeLink(c, cell.link);
    const loaded = loadVmConfig(c.vmConfig);
    // pre-copy: dodge QEMU 7.2's lost TCG dirty bits (PRECOPY_NOTE); both QEMUs must match
    const vm = postcopy ? loaded : { ...loaded, memoryMiB: loaded.memoryMiB + PRECOPY_RAM_PAD_MIB };
    src = await startVanillaQemu(c, c.src, vm, 'src', c.dir);
    tail.watch(src.serialLog);
    client = await workloadReady(c, cell, src.serialLog);
    run.bootMs = r2(now() - tb);
    const td = now();
    dst = await startVanillaQemu(c, c.dst, vm, 'dst', c.dir, { kind: 'defer' });
    tail.watch(dst.serialLog);
    const caps = { capabilities: [{ capability: 'postcopy-ram', state: postcopy }] };
    await dst.qmp.execute('migrate-set-capabilities', caps);
    const uri = `tcp:${c.dst.addr}:${VANILLA_PORT}`;
    await dst.qmp.execute('migrate-incoming', { uri });
    const setupMs = now() - td;
    await src.qmp.execute('migrate-set-capabilities', caps);
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BW, 'max-postcopy-bandwidth': UNLIMITED_BW });
    let stopAt: number | null = null;
    let resumeAt: number | null = null;
    const ms = (ts: { seconds: number; microseconds: number }) => ts.seconds * 1000 + ts.microseconds / 1000;
    src.qmp.on('event', (name, _d, ts) => {
      if (name === 'STOP' && stopAt === null) stopAt = ms(ts);
    });
    dst.qmp.on('event', (name, _d, ts) => {
      if (name === 'RESUME' && resumeAt === null) resumeAt = ms(ts);
    });
    const bytes0 = linkBytes(c);
    log(`${label}: migrating`);
    const t0Wall = Date.now();
    const t0 = now();
    await src.qmp.execute('migrate', { uri });
    if (postcopy) await src.qmp.execute('migrate-start-postcopy');
    const ram: { t: number; mib: number }[] = [{ t: 0, mib: 0 }];
    const events: { t: number; label: string }[] = [];
    let lastRam = 0;
    let final: Rec | null = null;
    const deadline = Date.now() + (postcopy ? MIGRATE_DEADLINE_MS : opt.precopyDeadlineS * 1000);
    for (;;) {
      const m = (await src.qmp.execute('query-migrate')) as Rec;
      const t = now() - t0;
      if (m.ram && t - lastRam >= 100) {
        ram.push({ t: r2(t / 1000), mib: r2(Number(m.ram.transferred) / MiB) });
        lastRam = t;
      }
      if (m.status === 'postcopy-active' && run.switchoverMs === null) {
        run.switchoverMs = r2(t);
        events.push({ t: r2(t / 1000), label: 'postcopy' });
      }
      if (m.status === 'completed') {
        run.totalMs = r2(t + setupMs);
        final = m;
        break;
      }
      if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`vanilla migration ${m.status}: ${m['error-desc'] ?? ''}`);
      if (Date.now() > deadline) {
        if (postcopy) throw new Error('vanilla post-copy did not complete');
        await src.qmp.execute('migrate_cancel');
        run.outcome = `no convergence in ${opt.precopyDeadlineS} s`;
        events.push({ t: r2(t / 1000), label: run.outcome });
        final = m;
        break;
      }
      await sleep(10);
    }
    const tEnd = Date.now();
    const bytes1 = linkBytes(c);
    run.linkBytes = { fwd: bytes1.fwd - bytes0.fwd, back: bytes1.back - bytes0.back };
    run.ramTransferred = Number(final.ram?.transferred ?? 0);
    run.timeline = { title: `${label}: vanilla ${postcopy ? 'post' : 'pre'}-copy`, ram, checkpoints: [], events };
    if (run.totalMs !== null) {
      run.outcome = 'completed';
      run.ok = true;
      run.qemuDowntimeMs = typeof final.downtime === 'number' ? final.downtime : null;
      events.push({ t: r2(run.totalMs / 1000), label: `completed (${(run.totalMs / 1000).toFixed(1)} s)` });
      log(`${label}: completed in ${run.totalMs} ms`);
      await waitFor(() => resumeAt !== null, 'destination RESUME', 30_000).catch((e: Error) =>
        log(`${label}: ${e.message}: no blackout figure`),
      );
      await workloadAfter(cell, dst.serialLog, fileSize(dst.serialLog), client);
      tail.stop();
      if (stopAt !== null && resumeAt !== null) run.blackoutMs = r2(resumeAt - stopAt);
      if (resumeAt !== null && postcopy) {
        run.postcopyWindowMs = r2(tEnd - resumeAt);
        if (isMemcheck(cell.workload)) run.guestRate = tail.rate(resumeAt, tEnd);
      }
      if (isMemcheck(cell.workload)) run.baselineRate = tail.baseline(t0Wall);
    }
    if (client) run.net = { answers: client.answers().length, violations: client.violations.length };
  } catch (e) {
    run.error = (e as Error).stack ?? String(e);
    log(`${label} failed: ${(e as Error).message}`);
  } finally {
    tail.stop();
    if (src) run.memcheck.push(corruptCheck(`${label} source serial`, src.serialLog));
    if (dst) run.memcheck.push(corruptCheck(`${label} destination serial`, dst.serialLog));
    keepLogs(c, label);
    await client?.stop();
    await killVanilla(dst);
    await killVanilla(src);
    await c.cleanup();
  }
  return run;
}

// ------------------------------------------------------------------ reused benches

/** Runs another bench as a child (`npm run bench <name>`) and reads back its JSON. */
async function childBench(name: string, args: string[], jsonFile: string): Promise<Rec | null> {
  log(`running bench ${name} ${args.join(' ')}`);
  const before = fs.existsSync(jsonFile) ? fs.statSync(jsonFile).mtimeMs : 0;
  const logFile = path.join(LOG_DIR, `bench-${name}.log`);
  const fd = fs.openSync(logFile, 'w');
  const code = await new Promise<number | null>((resolve) => {
    const p = spawn(process.execPath, ['--import', 'tsx', path.join(ROOT, 'tools', 'bench', 'run.ts'), name, ...args], {
      stdio: ['ignore', fd, fd],
      cwd: ROOT,
    });
    p.on('exit', (c) => resolve(c));
    p.on('error', () => resolve(null));
  });
  fs.closeSync(fd);
  if (code !== 0) {
    log(`bench ${name} exited ${code} (log: ${logFile})`);
    return null;
  }
  if (!fs.existsSync(jsonFile) || fs.statSync(jsonFile).mtimeMs === before) return null;
  return JSON.parse(fs.readFileSync(jsonFile, 'utf8')) as Rec;
}

/** A bench's latest JSON if a run left one (not run now). */
function latestJson(name: string): Rec | null {
  try {
    return JSON.parse(fs.readFileSync(path.join(OUT_DIR, `${name}.json`), 'utf8')) as Rec;
  } catch {
    return null;
  }
}

// ------------------------------------------------------------------ aggregation

const med = (v: (number | null | undefined)[]): number | null => {
  const x = v.filter((n): n is number => typeof n === 'number' && Number.isFinite(n));
  return x.length ? r2(percentile(x, 50)) : null;
};
const pct = (v: number[], p: number): number | null => (v.length ? r2(percentile(v, p)) : null);

interface CellStats {
  key: string;
  cell: Cell;
  n: number;
  ok: number;
  outcomes: string[];
  totalMs: number | null;
  blackoutMs: number | null;
  qemuDowntimeMs: number | null;
  fwdMiB: number | null;
  backMiB: number | null;
  checkpoints: number | null;
  checkpointMiB: number | null;
  trulyDirtiedMiB: number | null;
  /** Σ checkpoint bytes / Σ truly dirtied bytes over the runs. */
  ckptOverDirtied: number | null;
  guestRate: number | null;
  baselineRate: number | null;
  /** Over all checkpoints of all runs (pooled). */
  pause: Record<keyof PauseSplit, { p50: number | null; p99: number | null; max: number | null }> | null;
  heldMax: number | null;
}

/** A run counts when it completed and nothing failed after (e.g. the guest died on the destination). */
const good = (r: Run): boolean => r.ok && !r.error;
const outcomeOf = (r: Run): string =>
  good(r)
    ? r.outcome
    : r.ok
      ? `completed, then ${(r.error ?? '')
          .split('\n')[0]!
          .replace(/^Error: /, '')
          .slice(0, 80)}`
      : r.outcome;

function stats(key: string, runs: Run[]): CellStats {
  const ok = runs.filter(good);
  const pool = ok.flatMap((r) => r.pauses);
  const split = (k: keyof PauseSplit) => {
    const v = pool.map((p) => p[k]);
    return { p50: pct(v, 50), p99: pct(v, 99), max: v.length ? Math.max(...v) : null };
  };
  const withDirt = ok.filter((r) => r.trulyDirtiedBytes !== null && r.checkpointBytes !== null);
  const dirt = withDirt.reduce((s, r) => s + r.trulyDirtiedBytes!, 0);
  const ck = withDirt.reduce((s, r) => s + r.checkpointBytes!, 0);
  return {
    key,
    cell: runs[0]!.cell,
    n: runs.length,
    ok: ok.length,
    outcomes: runs.map(outcomeOf),
    totalMs: med(ok.map((r) => r.totalMs)),
    blackoutMs: med(ok.map((r) => r.blackoutMs)),
    qemuDowntimeMs: med(ok.map((r) => r.qemuDowntimeMs)),
    fwdMiB: med(ok.map((r) => (r.linkBytes ? r.linkBytes.fwd / MiB : null))),
    backMiB: med(ok.map((r) => (r.linkBytes ? r.linkBytes.back / MiB : null))),
    checkpoints: med(ok.map((r) => (r.cell.strategy.startsWith('tether') ? r.checkpoints : null))),
    checkpointMiB: med(ok.map((r) => (r.checkpointBytes !== null ? r.checkpointBytes / MiB : null))),
    trulyDirtiedMiB: med(ok.map((r) => (r.trulyDirtiedBytes !== null ? r.trulyDirtiedBytes / MiB : null))),
    ckptOverDirtied: dirt > 0 ? r2(ck / dirt) : null,
    guestRate: med(ok.map((r) => r.guestRate)),
    baselineRate: med(ok.map((r) => r.baselineRate)),
    pause: pool.length
      ? { stop: split('stop'), scan: split('scan'), devstate: split('devstate'), cont: split('cont'), total: split('total') }
      : null,
    heldMax: med(ok.map((r) => r.heldMax)),
  };
}

// ------------------------------------------------------------------ report

function fmt(v: number | null | undefined, digits = 0): string {
  return v === null || v === undefined ? '–' : v.toFixed(digits);
}

function runsTable(all: CellStats[]): string {
  const L = [
    '| part | strategy | workload | RAM | link | ok/n | total ms | blackout ms | QEMU downtime ms | fwd MiB | back MiB | ckpts | ckpt MiB | truly dirtied MiB | ckpt/dirtied | guest pages/s (post-copy) | undisturbed pages/s | pause p50/p99/max ms | p50 stop/scan/dev/cont ms | held frames max |',
    '|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|',
  ];
  for (const s of all) {
    const p = s.pause;
    L.push(
      `| ${s.cell.part} | ${s.cell.strategy} | ${s.cell.workload} | ${s.cell.ramMiB} | ${s.cell.link} | ${s.ok}/${s.n}${s.ok < s.n ? ` (${[...new Set(s.outcomes.filter((o) => o !== 'completed'))].join('; ')})` : ''} | ` +
        `${fmt(s.totalMs)} | ${fmt(s.blackoutMs)} | ${fmt(s.qemuDowntimeMs)} | ${fmt(s.fwdMiB, 1)} | ${fmt(s.backMiB, 1)} | ${fmt(s.checkpoints)} | ${fmt(s.checkpointMiB, 1)} | ` +
        `${fmt(s.trulyDirtiedMiB, 1)} | ${fmt(s.ckptOverDirtied, 2)} | ${fmt(s.guestRate)} | ${fmt(s.baselineRate)} | ` +
        `${p ? `${fmt(p.total.p50, 1)}/${fmt(p.total.p99, 1)}/${fmt(p.total.max, 1)}` : '–'} | ` +
        `${p ? `${fmt(p.stop.p50, 1)}/${fmt(p.scan.p50, 1)}/${fmt(p.devstate.p50, 1)}/${fmt(p.cont.p50, 1)}` : '–'} | ${fmt(s.heldMax)} |`,
    );
  }
  return L.join('\n');
}

interface Extras {
  floors: HashFloor[];
  rollback: Rec | null;
  gate: Rec | null;
  gateFresh: boolean;
  journal: Rec | null;
  journalFresh: boolean;
}

function targetFigures(all: CellStats[], x: Extras): Figure[] {
  const F: Figure[] = [];
  const find = (strategy: Strategy, workload: Workload, ramMiB: number, link: Link) =>
    all.find((s) => s.key === cellKey({ strategy, workload, ramMiB, link }));
  const ratio = (a: number | null | undefined, b: number | null | undefined) => (a != null && b != null && b > 0 ? r2(a / b) : null);
  // Comparisons at the grid's workload (and every other cell that has a vanilla post-copy twin).
  const tethers = all.filter((s) => s.cell.strategy.startsWith('tether'));
  for (const t of tethers) {
    const v = find('vanilla-postcopy', t.cell.workload, t.cell.ramMiB, t.cell.link);
    if (!v) continue;
    const where = `${t.cell.workload}, ${t.cell.ramMiB} MiB, ${t.cell.link}`;
    F.push({
      name: `total time ${t.cell.strategy} / vanilla post-copy (${where})`,
      value: ratio(t.totalMs, v.totalMs),
      unit: '×',
      target: { op: '<=', value: 1.05 },
      note: `${fmt(t.totalMs)} / ${fmt(v.totalMs)} ms, medians of ${t.ok} / ${v.ok}`,
    });
    if (isMemcheck(t.cell.workload)) {
      F.push({
        name: `guest progress in post-copy ${t.cell.strategy} / vanilla post-copy (${where})`,
        value: ratio(t.guestRate, v.guestRate),
        unit: '×',
        target: { op: '>=', value: 0.8 },
        note: `${fmt(t.guestRate)} / ${fmt(v.guestRate)} memcheck pages/s (undisturbed ${fmt(t.baselineRate)} / ${fmt(v.baselineRate)})`,
      });
    }
    F.push({
      name: `switchover blackout ${t.cell.strategy} / vanilla QEMU downtime (${where})`,
      value: ratio(t.blackoutMs, v.qemuDowntimeMs),
      unit: '×',
      target: { op: '<=', value: 2 },
      note: `${fmt(t.blackoutMs)} ms / ${fmt(v.qemuDowntimeMs)} ms; vanilla blackout measured like tether's: ${fmt(v.blackoutMs)} ms (${fmt(ratio(t.blackoutMs, v.blackoutMs), 2)}×)`,
    });
  }
  for (const t of tethers.filter((s) => isMemcheck(s.cell.workload))) {
    F.push({
      name: `checkpoint bytes / truly dirtied (${t.cell.strategy}, ${t.cell.workload}, ${t.cell.ramMiB} MiB, ${t.cell.link})`,
      value: t.ckptOverDirtied,
      unit: '×',
      target: { op: '<=', value: 1.1 },
      note: `${fmt(t.checkpointMiB, 1)} MiB sent back vs ${fmt(t.trulyDirtiedMiB, 1)} MiB dirtied (medians)`,
    });
  }
  for (const floor of x.floors) {
    const ram = floor.bytes / MiB;
    const ts = tethers.filter((s) => s.cell.ramMiB === ram && s.pause);
    const scanMax = ts.length ? Math.max(...ts.map((s) => s.pause!.scan.max ?? 0)) : null;
    const scanP50 = med(ts.map((s) => s.pause!.scan.p50));
    F.push({
      name: `scan pause max / hashing floor, ${ram} MiB`,
      value: ratio(scanMax, floor.ms),
      unit: '×',
      target: { op: '<=', value: 2 },
      note: `scan max ${fmt(scanMax, 1)} ms (p50 ${fmt(scanP50, 1)} ms) over ${ts.reduce((n, s) => n + s.ok, 0)} tether runs; floor ${floor.ms} ms (native hashFile, ${floor.threads} threads)`,
    });
  }
  const rb = x.rollback;
  if (rb) {
    const runs = (rb.rollback?.runs ?? []) as Rec[];
    for (const st of (rb.rollback?.stats ?? []) as Rec[]) {
      const what = st.standby === 'hot' ? 'hot standby' : 'fresh QEMU (cold)';
      const mine = runs.filter((r) => r.standby === st.standby && r.outcome === 'rolled-back' && r.rollback);
      const detect = mine.map((r) => Number(r.rollback.detectMs));
      F.push({
        name: `restore p50, ${what}`,
        value: st.restoreMs?.p50 ?? null,
        unit: 'ms',
        target: { op: '<=', value: 60 },
        note: `n=${st.n} (hot used ${st.hot}×); p99 ${fmt(st.restoreMs?.p99, 1)} ms; kill ${fmt(st.killMs, 1)}, start/load ${fmt(st.startMs, 1)}, announce ${fmt(st.announceMs, 1)} ms`,
      });
      F.push({
        name: `rollback detect p50 / p99, ${what}`,
        value: pct(detect, 50),
        unit: 'ms',
        note: `p99 ${fmt(pct(detect, 99), 1)} ms; interrupts: ${[...new Set(mine.map((r) => r.kind))].join(', ')}`,
      });
    }
  } else {
    F.push({ name: 'restore p50 (rollback)', value: null, unit: 'ms', target: { op: '<=', value: 60 }, note: 'not measured in this run' });
  }
  const from = (fresh: boolean, j: Rec) => (fresh ? 'this run' : `an earlier run, ${String(j.date ?? 'undated')}`);
  const gateRows = (x.gate?.rows ?? []) as Rec[];
  for (const mode of ['gated', 'pass']) {
    const r = gateRows.find((g) => String(g.test).startsWith('gate') && String(g.method).includes(mode) && g.frameBytes === 1500);
    F.push({
      name: `gate throughput, ${mode === 'gated' ? 'held + released every 25 ms' : 'pass-through'}, 1500-byte frames`,
      value: r ? Number(r.mbitPerS) : null,
      unit: 'Mbit/s',
      note:
        r && x.gate
          ? `bench gate (${from(x.gateFresh, x.gate)}), synthetic frame source; ${r.framesPerS} frames/s`
          : 'not measured in this run (`npm run bench gate`)',
    });
  }
  F.push({
    name: 'frame latency through the gate',
    value: null,
    unit: 'ms',
    note: 'not measured in this run (needs `bench net`, on another branch); the net workload reports the held-frames timeline instead',
  });
  const jRows = (x.journal?.rows ?? []) as Rec[];
  for (const w of ['seq', 'rand']) {
    const raw = jRows.find((r) => String(r.workload).startsWith(w) && r.device === 'raw');
    const jr = jRows.find((r) => String(r.workload).startsWith(w) && r.device === 'journaled');
    F.push({
      name: `journal throughput, ${w === 'seq' ? 'sequential 64 KiB' : 'random 4 KiB'} writes`,
      value: jr ? Number(jr.mibPerS) : null,
      unit: 'MiB/s',
      note:
        jr && raw && x.journal
          ? `bench journal (${from(x.journalFresh, x.journal)}); raw file ${raw.mibPerS} MiB/s (${r2(jr.mibPerS / raw.mibPerS)}×)`
          : 'not measured in this run (`npm run bench journal`)',
    });
  }
  return F;
}

/** Figures of the micro benches, lifted from their JSON (whatever numeric summary they carry). */
function microFigures(name: string, j: Rec | null, fresh: boolean): string[] {
  const rows = (j?.rows ?? []) as Rec[];
  if (!j || !rows.length) return [];
  const cols = Object.keys(rows[0]!);
  return [
    `### ${name} (${fresh ? 'this run' : `an earlier run, ${String(j.date ?? 'undated')}`})`,
    '',
    `| ${cols.join(' | ')} |`,
    `|${cols.map(() => '---').join('|')}|`,
    ...rows.map((r) => `| ${cols.map((c) => String(r[c] ?? '')).join(' | ')} |`),
  ];
}

// ------------------------------------------------------------------ plots

async function writePlots(all: CellStats[], runs: Run[], x: Extras): Promise<string[]> {
  const { files, put } = plotDir(RUN_DIR, log);
  for (const r of runs) if (r.timeline) await put(`timeline-${r.key}-r${r.repeat}.svg`, timelineSpec(r.timeline));
  const grid = all.filter((s) => s.cell.workload === (quick ? 'mc25' : 'mc25') && s.cell.ramMiB === GUEST_DEFAULT_MIB);
  const bars = (pick: (s: CellStats) => number | null, cells: CellStats[], group: (s: CellStats) => string) =>
    cells.flatMap((s) => {
      const v = pick(s);
      return v === null ? [] : [{ group: group(s), series: s.cell.strategy, value: v }];
    });
  const byLink = (s: CellStats) => s.cell.link;
  const rowsTotal = bars((s) => s.totalMs, grid, byLink);
  if (rowsTotal.length)
    await put(
      'compare-total.svg',
      barsSpec({ title: `Total migration time (memcheck 25 %, ${GUEST_DEFAULT_MIB} MiB)`, yTitle: 'ms (median)', rows: rowsTotal }),
    );
  const rowsBlack = bars((s) => s.blackoutMs, grid, byLink);
  if (rowsBlack.length)
    await put(
      'compare-blackout.svg',
      barsSpec({ title: 'Switchover blackout (guest running nowhere)', yTitle: 'ms (median)', rows: rowsBlack }),
    );
  const rowsProg = bars((s) => s.guestRate, grid, byLink);
  if (rowsProg.length)
    await put(
      'compare-progress.svg',
      barsSpec({ title: 'Guest progress in the post-copy window', yTitle: 'memcheck pages/s (median)', rows: rowsProg }),
    );
  const rowsBytes = grid.flatMap((s) =>
    s.fwdMiB === null
      ? []
      : [
          { group: `${s.cell.link} fwd`, series: s.cell.strategy, value: s.fwdMiB },
          { group: `${s.cell.link} back`, series: s.cell.strategy, value: s.backMiB ?? 0 },
        ],
  );
  if (rowsBytes.length)
    await put('compare-bytes.svg', barsSpec({ title: 'Bytes on the migration link', yTitle: 'MiB (median)', rows: rowsBytes }));
  const rowsPause = all
    .filter((s) => s.pause && s.cell.workload === 'mc25')
    .flatMap((s) =>
      (['stop', 'scan', 'devstate', 'cont'] as const).map((k) => ({
        group: k,
        series: `${s.cell.strategy} ${s.cell.ramMiB}M ${s.cell.link}`,
        value: s.pause![k].p50 ?? 0,
      })),
    );
  if (rowsPause.length) await put('compare-pause.svg', barsSpec({ title: 'Checkpoint pause p50, split', yTitle: 'ms', rows: rowsPause }));
  const ramCells = all.filter(
    (s) => s.cell.workload === 'mc25' && s.cell.link === '1gbit' && ['vanilla-postcopy', 'tether-50'].includes(s.cell.strategy),
  );
  const rowsRam = bars(
    (s) => s.totalMs,
    ramCells,
    (s) => `${s.cell.ramMiB} MiB`,
  );
  if (rowsRam.length > 2)
    await put(
      'compare-ram.svg',
      barsSpec({ title: 'Total time by guest RAM (memcheck 25 %, 1 Gbit/s)', yTitle: 'ms (median)', rows: rowsRam }),
    );
  const wl = all.filter(
    (s) => s.cell.link === '1gbit' && s.cell.ramMiB === GUEST_DEFAULT_MIB && ['vanilla-postcopy', 'tether-50'].includes(s.cell.strategy),
  );
  const rowsWl = bars(
    (s) => s.totalMs,
    wl,
    (s) => s.cell.workload,
  );
  if (rowsWl.length > 2)
    await put('compare-workload.svg', barsSpec({ title: 'Total time by workload (1 Gbit/s)', yTitle: 'ms (median)', rows: rowsWl }));
  const rbStats = (x.rollback?.rollback?.stats ?? []) as Rec[];
  const rowsRb = rbStats.flatMap((st) =>
    st.restoreMs
      ? [
          { group: 'p50', series: st.standby === 'hot' ? 'hot standby' : 'fresh QEMU', value: st.restoreMs.p50 },
          { group: 'p99', series: st.standby === 'hot' ? 'hot standby' : 'fresh QEMU', value: st.restoreMs.p99 },
        ]
      : [],
  );
  if (rowsRb.length)
    await put(
      'compare-restore.svg',
      barsSpec({ title: 'Restore after a failure', yTitle: 'ms', rows: rowsRb, target: { value: 60, label: 'goal p50 60 ms' } }),
    );
  return files;
}

// ------------------------------------------------------------------ main

function loadRuns(): Run[] {
  if (!fs.existsSync(RUNS_DIR)) return [];
  return fs
    .readdirSync(RUNS_DIR)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => JSON.parse(fs.readFileSync(path.join(RUNS_DIR, f), 'utf8')) as Run);
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('needs root (network namespaces)');
  const t0 = now();
  fs.mkdirSync(RUNS_DIR, { recursive: true });
  fs.mkdirSync(LOG_DIR, { recursive: true });
  const cells = plan(opt.parts);
  // The report describes the whole plan: a run in pieces (--parts, --dir) ends with all of it.
  const fullPlan = process.argv.includes('--dir') ? new Set<Part>(ALL_PARTS) : opt.parts;
  const planLines = planText(plan(fullPlan), fullPlan);
  log(`plan:\n  ${planLines.join('\n  ')}`);
  const done = new Set(loadRuns().map((r) => `${r.key}-r${r.repeat}`));
  const measure = async (repeat: number) => {
    for (const cell of cells) {
      const id = `${cellKey(cell)}-r${repeat}`;
      if (reportOnly || repeat > cell.repeats || done.has(id)) continue;
      const run = cell.strategy.startsWith('tether') ? await runTether(cell, repeat) : await runVanilla(cell, repeat);
      fs.writeFileSync(path.join(RUNS_DIR, `${id}.json`), JSON.stringify(run, null, 1) + '\n');
    }
  };
  // Breadth first: one run of every cell, then the reused benches, then the further repeats,
  // so that a run cut short (or resumed with --dir) still covers the whole plan.
  await measure(1);
  const x: Extras = { floors: [], rollback: null, gate: null, gateFresh: false, journal: null, journalFresh: false };
  const rbFile = path.join(RUN_DIR, 'rollback.json');
  if (opt.parts.has('rollback') && !reportOnly && !fs.existsSync(rbFile)) {
    const args = quick
      ? [
          '--only',
          'rollback',
          '--standby',
          'on',
          '--rollback-repeats',
          '1',
          '--rollback-kinds',
          'abort',
          '--passes',
          '1',
          '--memcheck-mb',
          '32',
          '--guest-mib',
          '256',
          // the smoke's one rollback takes the NIC + disk path of the hot standby
          '--rollback-vm',
          'io',
        ]
      : ['--only', 'rollback', '--rollback-repeats', String(opt.rollbackRepeats), '--passes', '1'];
    const j = await childBench('migrate', args, path.join(OUT_DIR, 'migrate.json'));
    if (j) fs.writeFileSync(rbFile, JSON.stringify(j, null, 1) + '\n');
  }
  if (fs.existsSync(rbFile)) x.rollback = JSON.parse(fs.readFileSync(rbFile, 'utf8')) as Rec;
  for (const [name, args] of [
    ['gate', ['--seconds', '2']],
    ['journal', ['--mib', '64']],
  ] as const) {
    const file = path.join(RUN_DIR, `${name}.json`);
    if (opt.parts.has('micro') && !quick && !reportOnly && !fs.existsSync(file)) {
      const j = await childBench(name, [...args], path.join(OUT_DIR, `${name}.json`));
      if (j) fs.writeFileSync(file, JSON.stringify(j, null, 1) + '\n');
    }
    const fresh = fs.existsSync(file);
    const j = fresh ? (JSON.parse(fs.readFileSync(file, 'utf8')) as Rec) : latestJson(name);
    if (name === 'gate') [x.gate, x.gateFresh] = [j, fresh];
    else [x.journal, x.journalFresh] = [j, fresh];
  }
  for (let r = 2; r <= Math.max(0, ...cells.map((c) => c.repeats)); r++) await measure(r);

  const runs = loadRuns();
  const keys = [...new Set(runs.map((r) => r.key))];
  const order = (k: string) => {
    const i = plan(fullPlan).findIndex((c) => cellKey(c) === k);
    return i < 0 ? 1000 : i;
  };
  keys.sort((a, b) => order(a) - order(b));
  const all = keys.map((k) =>
    stats(
      k,
      runs.filter((r) => r.key === k),
    ),
  );
  const rams = [...new Set(all.filter((s) => s.cell.strategy.startsWith('tether')).map((s) => s.cell.ramMiB))].sort((a, b) => a - b);
  // --report-only measures nothing (it may run beside another benchmark): the floors of an
  // earlier report of this folder, if any.
  let earlier: HashFloor[] = [];
  let earlierRun: { command?: string; durationMs?: number; date?: string } = {};
  try {
    const e = JSON.parse(fs.readFileSync(path.join(RUN_DIR, 'suite.json'), 'utf8')) as { hashFloors?: HashFloor[]; command?: string };
    earlier = e.hashFloors ?? [];
    earlierRun = e;
  } catch {
    /* none */
  }
  for (const ram of rams) {
    const f = reportOnly ? earlier.find((e) => e.bytes === ram * MiB) : await hashFloor(ram);
    if (f) x.floors.push(f);
  }

  const corrupt = runs.reduce((n, r) => n + r.memcheck.reduce((m, c) => m + c.corrupt, 0), 0);
  const netViol = runs.reduce((n, r) => n + (r.net?.violations ?? 0), 0);
  const figs = targetFigures(all, x);
  figs.push({ name: 'memcheck CORRUPT lines, all serial logs', value: corrupt, unit: '', target: { op: '<=', value: 0 } });
  if (runs.some((r) => r.net))
    figs.push({ name: 'netcheck violations (net workload)', value: netViol, unit: '', target: { op: '<=', value: 0 } });
  const plots = await writePlots(all, runs, x);
  const failed = runs.filter((r) => r.error);

  // --report-only describes the run that measured (its command, duration and date).
  const command =
    reportOnly && earlierRun.command
      ? earlierRun.command
      : `npm run bench -- ${process.argv.slice(2).join(' ')}`.trim().replace(/ --$/, '');
  const durationMs = reportOnly && earlierRun.durationMs ? earlierRun.durationMs : r2(now() - t0);
  const started = reportOnly && earlierRun.date ? earlierRun.date : STARTED;
  const load = os
    .loadavg()
    .map((l) => l.toFixed(2))
    .join(' ');
  const md = [
    `# Benchmark suite${quick ? ' (quick: CI smoke, figures not meaningful)' : ''}, ${started}`,
    '',
    `\`${command}\` — QEMU TCG, ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), load average ${load} at the end; other work may share the machine.`,
    '',
    '## Plan',
    '',
    '```',
    ...planLines,
    '```',
    '',
    '## Targets (issue 8)',
    '',
    markdownTable(figs),
    '',
    'PASS/MISS are findings about this run, not test failures.',
    '',
    '## Every cell (medians over its runs; pauses pooled over all checkpoints of its runs)',
    '',
    runsTable(all),
    '',
    ...microFigures('bench journal', x.journal, x.journalFresh),
    '',
    ...microFigures('bench gate', x.gate, x.gateFresh),
    '',
    '## Definitions',
    '',
    `- ${BLACKOUT_NOTE}`,
    `- ${TRULY_DIRTIED_NOTE}`,
    `- ${PROGRESS_NOTE}`,
    `- ${PRECOPY_NOTE}`,
    '- total: tether from the migrate request in the source daemon to completed (destination QEMU start included); vanilla from spawning the destination QEMU to the source query-migrate `completed` (10 ms polls).',
    '- bytes each way: the source end of the migration veth, tx (forward) and rx (back) during the migration: all traffic, QEMU stream and tether peer channel.',
    '- pause split: stop (QMP stop), scan (dirty collection and page copy), devstate (device state save and disk seal), cont (QMP cont).',
    ...(failed.length
      ? ['', '## Runs that failed', '', ...failed.map((r) => `- ${r.key}-r${r.repeat}: ${(r.error ?? '').split('\n')[0]}`)]
      : []),
    '',
  ].join('\n');
  const json = {
    bench: 'suite',
    date: started,
    durationMs,
    command,
    quick,
    plan: planLines,
    host: {
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model,
      kernel: os.release(),
      node: process.version,
      qemu: qemuVersion(),
      loadavg: os.loadavg(),
    },
    options: { ...opt, parts: [...opt.parts] },
    notes: [BLACKOUT_NOTE, TRULY_DIRTIED_NOTE, PROGRESS_NOTE, PRECOPY_NOTE],
    targets: figs,
    cells: all,
    hashFloors: x.floors,
    rollback: x.rollback ? { stats: x.rollback.rollback?.stats ?? null, date: x.rollback.date } : null,
    corruptTotal: corrupt,
    failedRuns: failed.map((r) => `${r.key}-r${r.repeat}`),
    plots,
    runFiles: fs.readdirSync(RUNS_DIR).sort(),
  };
  const jsonText = JSON.stringify(json, null, 1) + '\n';
  fs.writeFileSync(path.join(RUN_DIR, 'suite.json'), jsonText);
  fs.writeFileSync(
    path.join(RUN_DIR, 'summary.md'),
    md +
      plots
        .filter((p) => p.startsWith('compare'))
        .map((p) => `\n![${p}](${p})\n`)
        .join(''),
  );
  fs.writeFileSync(path.join(OUT_DIR, quick ? 'suite-quick.json' : 'suite.json'), jsonText);
  fs.writeFileSync(path.join(OUT_DIR, quick ? 'suite-quick.md' : 'suite.md'), md);
  console.log(md);
  console.log(
    `wrote ${RUN_DIR}/ (suite.json, summary.md, runs/, ${plots.length} SVG plots, logs/) in ${((now() - t0) / 1000).toFixed(1)} s`,
  );
  // A MISS is a finding, never a failure. The smoke (--quick, run by `npm test`) fails on any
  // migration that errored or any CORRUPT line: that is the rot it is there to catch. A full run
  // fails only when it produced no figures at all.
  const rollbackOk = !opt.parts.has('rollback') || ((x.rollback?.rollback?.stats ?? []) as Rec[]).some((st) => st.n > 0);
  if (quick ? failed.length > 0 || corrupt > 0 || !rollbackOk : runs.length > 0 && runs.every((r) => r.error)) {
    process.exitCode = 1;
    log(
      quick
        ? `smoke failed: ${failed.length} runs errored, ${corrupt} CORRUPT lines, rollback measured: ${rollbackOk}`
        : 'every migration failed',
    );
  }
}

function qemuVersion(): string {
  try {
    return execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0] ?? '';
  } catch {
    return '';
  }
}

await main();
