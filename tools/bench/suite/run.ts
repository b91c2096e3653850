/**
 * One migration of a suite cell, measured: tether (runTether) or vanilla QEMU pre-/post-copy
 * (runVanilla), each in its own Cluster, into a Run record (one JSON file per run); the runs a
 * folder holds (loadRuns) and the native hashing floors the scan pause is compared with.
 */
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../../lab/cluster.ts';
import { type NetClient } from '../../../lab/net/driver.ts';
import { fileSize, waitFor } from '../../../lab/proc.ts';
import { loadVmConfig } from '../../../src/config/load.ts';
import type { MigrationResult } from '../../../src/migrate/result.ts';
import {
  corruptCheck,
  digestLogs,
  hashFloor,
  killVanilla,
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
  type LogDigest,
  type Rec,
  type VQemu,
} from '../lib.ts';
import { ProgressTail } from '../progress.ts';
import type { TimelineInput } from '../report.ts';
import { clusterOpts, HeldScraper, isMemcheck, keepLogs, linkBytes, workloadAfter, workloadReady } from './observe.ts';
import {
  cellKey,
  MIGRATE_DEADLINE_MS,
  opt,
  PRECOPY_RAM_PAD_MIB,
  reportOnly,
  RUNS_DIR,
  UNLIMITED_BW,
  VANILLA_PORT,
  type Cell,
} from './plan.ts';

export interface PauseSplit {
  stop: number;
  scan: number;
  devstate: number;
  cont: number;
  total: number;
}

export interface Run {
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

/** One tether migration of `cell` in its own cluster: every figure of a Run. */
export async function runTether(cell: Cell, repeat: number): Promise<Run> {
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
    tetherFigures(run, d, tail, t0Wall);
    if (scraper) {
      run.heldMax = scraper.samples.reduce((m, s) => Math.max(m, s.held), 0);
    }
    if (client) run.net = { answers: client.answers().length, violations: client.violations.length };
    run.timeline = timelineOf(`${label}: tether`, mig.progress, d, result);
    if (scraper) run.timeline.held = heldTimeline(scraper, mig.progress, d, t0Wall, result.totalMs);
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

/** The figures of a tether run that come from its sidecars' logs (checkpoint pauses, blackout, post-copy window). */
function tetherFigures(run: Run, d: LogDigest, tail: ProgressTail, t0Wall: number): void {
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
    if (isMemcheck(run.cell.workload)) {
      run.guestRate = tail.rate(t0Wall + running, t0Wall + done);
      run.baselineRate = tail.baseline(t0Wall);
      run.trulyDirtiedBytes = trulyDirtied(tail, cps, t0Wall, running);
    }
  }
}

/** Truly dirtied: memcheck's distinct pages per epoch, epoch k = stop(k-1) .. stop(k); null if a position is unknown. */
function trulyDirtied(tail: ProgressTail, cps: LogDigest['checkpoints'], t0Wall: number, running: number): number | null {
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
  return known ? Math.round(dirtied) * 4096 : null;
}

/** The destination gate's held frames, aligned like the checkpoints: wall clock since t0Wall, shifted by timelineOf's offset. */
function heldTimeline(
  scraper: HeldScraper,
  progress: Rec[],
  d: LogDigest,
  t0Wall: number,
  totalMs: number,
): { t: number; frames: number }[] {
  const pre = progress.find((p) => p.phase === 'precopy');
  const preWall = d.phases.find((p) => p.host === 'host-s' && p.msg.endsWith('-> precopy'));
  const offset = pre && preWall ? preWall.atMs - Number(pre.t) : 0;
  return scraper.samples
    .filter((s) => s.t >= t0Wall)
    .map((s) => ({ t: r2((s.t - t0Wall - offset) / 1000), frames: s.held }))
    .filter((s) => s.t <= (totalMs + 2000) / 1000);
}

/** One vanilla QEMU migration (pre- or post-copy) of `cell`, QEMUs started directly in the cluster's namespaces. */
export async function runVanilla(cell: Cell, repeat: number): Promise<Run> {
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
    const clock = blackoutClock(src, dst);
    const bytes0 = linkBytes(c);
    log(`${label}: migrating`);
    const t0Wall = Date.now();
    const t0 = now();
    await src.qmp.execute('migrate', { uri });
    if (postcopy) await src.qmp.execute('migrate-start-postcopy');
    const { ram, events, final } = await pollVanilla(src, run, postcopy, t0, setupMs);
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
      await waitFor(() => clock.resumeAt !== null, 'destination RESUME', 30_000).catch((e: Error) =>
        log(`${label}: ${e.message}: no blackout figure`),
      );
      await workloadAfter(cell, dst.serialLog, fileSize(dst.serialLog), client);
      tail.stop();
      vanillaFigures(run, clock, tail, postcopy, t0Wall, tEnd);
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

interface BlackoutClock {
  /** The source's first STOP and the destination's first RESUME, QEMU's event timestamps (ms). */
  stopAt: number | null;
  resumeAt: number | null;
}

function blackoutClock(src: VQemu, dst: VQemu): BlackoutClock {
  const clock: BlackoutClock = { stopAt: null, resumeAt: null };
  const ms = (ts: { seconds: number; microseconds: number }) => ts.seconds * 1000 + ts.microseconds / 1000;
  src.qmp.on('event', (name, _d, ts) => {
    if (name === 'STOP' && clock.stopAt === null) clock.stopAt = ms(ts);
  });
  dst.qmp.on('event', (name, _d, ts) => {
    if (name === 'RESUME' && clock.resumeAt === null) clock.resumeAt = ms(ts);
  });
  return clock;
}

/**
 * Poll query-migrate every 10 ms until the migration completes (run.totalMs set), fails
 * (throws) or, pre-copy only, does not converge by the deadline (cancelled, run.outcome says so).
 */
async function pollVanilla(
  src: VQemu,
  run: Run,
  postcopy: boolean,
  t0: number,
  setupMs: number,
): Promise<{ ram: { t: number; mib: number }[]; events: { t: number; label: string }[]; final: Rec }> {
  const ram: { t: number; mib: number }[] = [{ t: 0, mib: 0 }];
  const events: { t: number; label: string }[] = [];
  let lastRam = 0;
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
      return { ram, events, final: m };
    }
    if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`vanilla migration ${m.status}: ${m['error-desc'] ?? ''}`);
    if (Date.now() > deadline) {
      if (postcopy) throw new Error('vanilla post-copy did not complete');
      await src.qmp.execute('migrate_cancel');
      run.outcome = `no convergence in ${opt.precopyDeadlineS} s`;
      events.push({ t: r2(t / 1000), label: run.outcome });
      return { ram, events, final: m };
    }
    await sleep(10);
  }
}

/** Blackout, post-copy window and guest progress of a completed vanilla run. */
function vanillaFigures(run: Run, clock: BlackoutClock, tail: ProgressTail, postcopy: boolean, t0Wall: number, tEnd: number): void {
  const { stopAt, resumeAt } = clock;
  if (stopAt !== null && resumeAt !== null) run.blackoutMs = r2(resumeAt - stopAt);
  if (resumeAt !== null && postcopy) {
    run.postcopyWindowMs = r2(tEnd - resumeAt);
    if (isMemcheck(run.cell.workload)) run.guestRate = tail.rate(resumeAt, tEnd);
  }
  if (isMemcheck(run.cell.workload)) run.baselineRate = tail.baseline(t0Wall);
}

/** The runs already in the run's folder (this run's and, with --dir, earlier ones). */
export function loadRuns(): Run[] {
  if (!fs.existsSync(RUNS_DIR)) return [];
  return fs
    .readdirSync(RUNS_DIR)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => JSON.parse(fs.readFileSync(path.join(RUNS_DIR, f), 'utf8')) as Run);
}

/**
 * The native hashing floor for each RAM size tether ran at; --report-only measures nothing
 * (it may run beside another benchmark): the floors of an earlier report of this folder, if any.
 */
export async function measureFloors(rams: number[], earlier: HashFloor[]): Promise<HashFloor[]> {
  const floors: HashFloor[] = [];
  for (const ram of rams) {
    const f = reportOnly ? earlier.find((e) => e.bytes === ram * MiB) : await hashFloor(ram);
    if (f) floors.push(f);
  }
  return floors;
}
