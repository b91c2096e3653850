/**
 * Pieces the migration benchmarks share (tools/bench/migrate.ts, tools/bench/suite.ts):
 * daemon-log digests, timelines, vanilla QEMU started directly in a cluster namespace,
 * the hashing floor of a RAM size.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../lab/cluster.ts';
import { memcheck } from '../../lab/serial.ts';
import { sh } from '../../lab/proc.ts';
import { type Host } from '../../lab/topology.ts';
import type { VmConfig } from '../../src/config/types.ts';
import { callDaemon } from '../../src/control/client.ts';
import { hashFile, mapRam, PAGE_SIZE, unmapRam } from '../../src/native.ts';
import type { MigrationResult } from '../../src/migrate/result.ts';
import { buildQemuArgs, type QemuIncoming } from '../../src/qemu/cmdline.ts';
import { QmpClient } from '../../src/qmp/client.ts';
import { createLogger, ignored } from '../../src/util/log.ts';
import { percentile } from '../../src/util/time.ts';
import type { TimelineInput } from './report.ts';

export const MiB = 1024 * 1024;
export const now = (): number => performance.now();
export const r2 = (v: number): number => Math.round(v * 100) / 100;

export function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

export function log(s: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 23)}] ${s}\n`);
}

/** The benchmarks' Logger (for ignored() and src/ code that takes one): its lines go through log(). */
export const benchLog = createLogger({}, 'debug', (line) => log(line));

// ------------------------------------------------------------------ log helpers

export type Rec = Record<string, any>;

/** JSON records of a daemon log from byte `from` on. */
export function records(file: string, from = 0): Rec[] {
  let text = '';
  try {
    text = fs.readFileSync(file).subarray(from).toString('utf8');
  } catch {
    return [];
  }
  const out: Rec[] = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      out.push(JSON.parse(line) as Rec);
    } catch {
      /* a partial last line */
    }
  }
  return out;
}

export interface LogDigest {
  /** Per-checkpoint records the destination logged ("checkpoint sent"). */
  checkpoints: {
    epoch: number;
    /** When the destination logged it, ms since `t0` (wall clock). */
    atMs: number;
    pages: number;
    bytes: number;
    pauseMs: number;
    /** QMP stop; part of collectMs (collect = stop + scan + read). */
    stopMs: number;
    collectMs: number;
    saveMs: number;
    sendMs: number;
  }[];
  /** State-machine transitions on both hosts, ms since `t0` (wall clock). */
  phases: { host: string; atMs: number; msg: string }[];
  /**
   * QEMU's own times (QMP event timestamps, ms since `t0`) of the source's switchover STOP
   * and the destination's RESUME: the switchover blackout, measured like vanilla's.
   */
  qemuStopAt: number | null;
  qemuResumeAt: number | null;
  /** warn/error messages on both hosts, counted. */
  warnings: Record<string, number>;
  fences: { host: string; reason: string }[];
}

export function digestLogs(c: Cluster, offsets: { src: number; dst: number }, t0Wall: number): LogDigest {
  const d: LogDigest = { checkpoints: [], phases: [], qemuStopAt: null, qemuResumeAt: null, warnings: {}, fences: [] };
  for (const [h, from] of [
    [c.src, offsets.src],
    [c.dst, offsets.dst],
  ] as const) {
    for (const r of records(h.daemonLog, from)) {
      const at = Date.parse(String(r.t)) - t0Wall;
      if (r.msg === 'checkpoint sent') {
        d.checkpoints.push({
          epoch: r.epoch,
          atMs: at,
          pages: r.pages,
          bytes: r.bytes,
          pauseMs: r.pauseMs,
          stopMs: r.stopMs,
          collectMs: r.collectMs,
          saveMs: r.saveMs,
          sendMs: r.sendMs,
        });
      }
      if (typeof r.msg === 'string' && / -> /.test(r.msg)) d.phases.push({ host: h.name, atMs: at, msg: r.msg });
      if (typeof r.qemuStopAt === 'number' && d.qemuStopAt === null) d.qemuStopAt = r.qemuStopAt - t0Wall;
      if (typeof r.qemuResumeAt === 'number' && d.qemuResumeAt === null) d.qemuResumeAt = r.qemuResumeAt - t0Wall;
      if (r.level === 'warn' || r.level === 'error') {
        const k = `${h.name} ${r.level}: ${r.msg}`;
        d.warnings[k] = (d.warnings[k] ?? 0) + 1;
      }
      if (typeof r.msg === 'string' && r.msg.startsWith('fencing')) d.fences.push({ host: h.name, reason: String(r.reason) });
    }
  }
  return d;
}

export interface CorruptCheck {
  log: string;
  passes: number;
  corrupt: number;
  firstCorrupt?: string;
}
export function corruptCheck(label: string, file: string): CorruptCheck {
  const m = memcheck(file);
  return { log: label, passes: m.passes.length, corrupt: m.corrupt.length, ...(m.corrupt[0] ? { firstCorrupt: m.corrupt[0] } : {}) };
}

export async function status(c: Cluster, h: Host): Promise<Rec> {
  try {
    return (await callDaemon(h.socket, 'status', { vm: c.vmName })) as Rec;
  } catch (e) {
    return { state: 'absent', error: (e as Error).message };
  }
}

/**
 * A migration's timeline in seconds since the source started it: the CLI's progress
 * records (source clock) for RAM sent, the daemons' logs (wall clock) for checkpoints and
 * phases, aligned on the source's "-> precopy" transition that both record.
 */
export function timelineOf(title: string, progress: Rec[], digest: LogDigest, result: MigrationResult | null): TimelineInput {
  const pre = progress.find((p) => p.phase === 'precopy');
  const preWall = digest.phases.find((p) => p.host === 'host-s' && p.msg.endsWith('-> precopy'));
  const offset = pre && preWall ? preWall.atMs - Number(pre.t) : 0;
  const events = digest.phases
    // the final phase is drawn once, as the outcome below
    .filter((p) => p.host === 'host-s' && p.msg.startsWith('migration ') && !/-> (completed|rolled-back|failed)$/.test(p.msg))
    .map((p) => ({ t: r2((p.atMs - offset) / 1000), label: p.msg.replace(/^migration \S+ -> /, '') }));
  if (result) {
    const rb = result.rollback;
    const label = rb
      ? `${result.outcome} ${Math.round(rb.restoreMs)} ms ${rb.hot ? 'hot' : 'cold'}`
      : `${result.outcome} (${(result.totalMs / 1000).toFixed(1)} s)`;
    events.push({ t: r2(result.totalMs / 1000), label });
  }
  return {
    title,
    ram: [
      { t: 0, mib: 0 },
      ...progress.filter((p) => p.ram).map((p) => ({ t: r2(Number(p.t) / 1000), mib: r2(Number(p.ram.transferred) / MiB) })),
    ],
    checkpoints: digest.checkpoints.map((c) => ({
      t: r2((c.atMs - offset) / 1000),
      epoch: c.epoch,
      pauseMs: c.pauseMs,
      kib: r2(c.bytes / 1024),
    })),
    events,
  };
}

export interface VQemu {
  label: string;
  child: ChildProcess;
  pid: number;
  qmp: QmpClient;
  serialLog: string;
  logFile: string;
  qmpSocket: string;
  exited: Promise<void>;
}

/**
 * QemuProcess has no network-namespace support (QemuStartOptions.netns is a placeholder),
 * so spawn `ip netns exec <ns> setpriv --pdeathsig SIGKILL -- qemu …` (both exec: the pid
 * is QEMU's) with the same command line tether builds, and talk QMP on its socket.
 * Paths live under the cluster's dirs, so Cluster.cleanup() also kills/removes them.
 */
export async function startVanillaQemu(
  c: Cluster,
  h: Host,
  vm: VmConfig,
  label: string,
  logDir: string,
  incoming?: QemuIncoming,
): Promise<VQemu> {
  // Serial log, QEMU log and QMP socket under bench-results/ (kept as the run's logs), not
  // under the cluster's /tmp dir: in the first run that dir vanished mid-run (removed from
  // outside). The RAM file stays under /dev/shm/tether-<id>/ so Cluster.cleanup() finds it.
  const dir = path.join(logDir, 'vanilla', label);
  fs.rmSync(dir, { recursive: true, force: true });
  const ramDir = `/dev/shm/tether-${c.id}/vanilla`;
  fs.mkdirSync(dir, { recursive: true });
  fs.mkdirSync(ramDir, { recursive: true });
  const paths = {
    ramFile: path.join(ramDir, `${label}.ram`),
    qmpSocket: path.join(dir, 'qmp.sock'),
    serialLog: path.join(dir, 'serial.log'),
  };
  fs.rmSync(paths.ramFile, { force: true });
  fs.rmSync(paths.qmpSocket, { force: true });
  const logFile = path.join(dir, 'qemu.log');
  const fd = fs.openSync(logFile, 'a');
  const argv = ['netns', 'exec', h.ns, 'setpriv', '--pdeathsig', 'SIGKILL', '--', vm.qemu.binary, ...buildQemuArgs(vm, paths, incoming)];
  const child = spawn('ip', argv, { stdio: ['ignore', fd, fd] });
  fs.closeSync(fd);
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', () => resolve());
  });
  const ac = new AbortController();
  void exited.then(() => ac.abort());
  let qmp: QmpClient;
  try {
    qmp = await QmpClient.connect(paths.qmpSocket, { retryUntilMs: 30_000, timeoutMs: 30_000, signal: ac.signal });
  } catch (e) {
    child.kill('SIGKILL');
    let tail = '';
    try {
      tail = fs.readFileSync(logFile, 'utf8').slice(-1500);
    } catch {
      /* none */
    }
    throw new Error(`vanilla QEMU ${label} did not start: ${(e as Error).message} ${tail}`);
  }
  return { label, child, pid: child.pid ?? -1, qmp, serialLog: paths.serialLog, logFile, qmpSocket: paths.qmpSocket, exited };
}

export async function killVanilla(q: VQemu | undefined): Promise<void> {
  if (!q) return;
  await q.qmp.close().catch(ignored(benchLog, 'the QMP socket of a QEMU being killed may already be closed'));
  if (q.child.exitCode === null && q.child.signalCode === null) q.child.kill('SIGKILL');
  await Promise.race([q.exited, sleep(5000)]);
  fs.rmSync(q.qmpSocket, { force: true });
}

export interface HashFloor {
  bytes: number;
  threads: number;
  /** Median of 3 native hashFile passes over a populated file of the guest's size (tmpfs, mapped). */
  ms: number;
}

/**
 * The hashing floor of the guest's RAM on this machine: the native hash over every page of
 * a populated file of that size, with all cores — what a scan of the same bytes cannot beat.
 */
export async function hashFloor(guestMiB: number): Promise<HashFloor> {
  const bytes = guestMiB * MiB;
  const pages = bytes / PAGE_SIZE;
  const file = `/dev/shm/tether-bench-floor-${process.pid}.ram`;
  const fd = fs.openSync(file, 'w+');
  try {
    const chunk = Buffer.alloc(2 * MiB, 0x5a);
    for (let off = 0; off < bytes; off += chunk.length) {
      chunk.writeUInt32LE(off, 0);
      fs.writeSync(fd, chunk, 0, chunk.length, off);
    }
    const table = Buffer.alloc(pages * 8);
    const threads = os.cpus().length;
    const times: number[] = [];
    // The floor reads the bytes the cheapest way this code knows, the way the scan does:
    // through a mapping of the file (mapRam), all cores.
    const map = mapRam(fd, pages);
    try {
      for (let i = 0; i < 3; i++) {
        const t0 = now();
        await hashFile(fd, pages, table, threads, map);
        times.push(now() - t0);
      }
    } finally {
      if (map) unmapRam(map);
    }
    return { bytes, threads, ms: r2(percentile(times, 50)) };
  } finally {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
}

/** The migration link settings the benchmarks shape with tbf. */
export type Link = '1gbit' | '200mbit';
export const LINKS: Record<Link, { rate: string; burst: string; mbit: number }> = {
  // burst ≥ rate / HZ (250) so tbf can reach its rate; latency bounds the queue
  '1gbit': { rate: '1gbit', burst: '1mb', mbit: 1000 },
  '200mbit': { rate: '200mbit', burst: '256kb', mbit: 200 },
};

/** Shapes the migration link (veth ends in both namespaces) with tbf, both directions. */
export function shapeLink(c: Cluster, link: Link): void {
  const l = LINKS[link];
  for (const [ns, dev] of [
    [c.src.ns, `${c.id}a`],
    [c.dst.ns, `${c.id}b`],
  ] as const) {
    sh('ip', [
      'netns',
      'exec',
      ns,
      'tc',
      'qdisc',
      'replace',
      'dev',
      dev,
      'root',
      'tbf',
      'rate',
      l.rate,
      'burst',
      l.burst,
      'latency',
      '50ms',
    ]);
  }
}

/**
 * Copies a cluster's daemon and serial logs (and `extra` [from, name] pairs) into `dir`,
 * which must exist; a file the run never created is skipped.
 */
export function copyClusterLogs(c: Cluster, dir: string, extra: [string, string][] = []): void {
  for (const [from, name] of [
    [c.src.daemonLog, 'daemon-s.log'],
    [c.dst.daemonLog, 'daemon-d.log'],
    [c.serialLog(c.src), 'serial-s.log'],
    [c.serialLog(c.dst), 'serial-d.log'],
    ...extra,
  ]) {
    try {
      fs.copyFileSync(from!, path.join(dir, name!));
    } catch {
      /* not created in this run */
    }
  }
}
