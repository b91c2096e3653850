/**
 * Real-application benchmark (issue 14, docs/apps.md): `npm run bench apps [-- --quick]`.
 *
 * The Debian guest of lab/apps/ (memcached, PostgreSQL 15 and nginx, booted from its
 * own disk; --ram-mib of RAM, --cold-mib of it filled once at boot with bytes nobody reads
 * again: the cold memory post-copy still has to bring over after the services' working
 * set, without which the post-copy window is little more than the stall that starts it)
 * under load from the client namespace, all three at once, migrated
 * by tether (checkpoint interval 50 ms, the gate on its NIC, its disk through the sidecar in
 * post-copy) and by vanilla QEMU post-copy (migrate, then migrate-start-postcopy at once; a
 * plain QEMU TAP; the same image file opened by both QEMUs: shared storage), each on a
 * migration link shaped with tbf at 1 Gbit/s and 200 Mbit/s, in the same run.
 *
 * Load (closed loops, one request in flight per connection):
 *   memcached   --conns connections alternating set and get of a 64-byte value (tools/bench/apps-load.ts)
 *   nginx       --conns HTTP/1.1 keep-alive connections GETting a 65-byte file (apps-load.ts)
 *   PostgreSQL  one psql connection, BEGIN; INSERT; COMMIT one after the other (lab/apps/pg.ts):
 *               commit latency = transaction written to psql → its COMMIT tag back
 * Per workload and phase — before (the --phase-s seconds before the migrate request),
 * during (the post-copy window: the destination's QEMU resumed → migration completed) and
 * after (the --phase-s seconds from 1 s after completion) — requests completed per second
 * and latency p50/p99 of the requests that completed in it.
 *
 * Targets: during the window, tether's throughput ≥ 0.5× vanilla post-copy's for memcached
 * and nginx; PostgreSQL's commit latency in the window is printed beside the checkpoint
 * epoch period (the gate holds an answer until the epoch that produced it is acknowledged:
 * at least one period, plus the checkpoint's pause and round trip).
 *
 * Output: bench-results/apps-<time>.json and the latest at bench-results/apps.json, apps.md and
 * apps.svg (the plot, tools/bench/apps-plot.ts).
 *
 * Options (defaults; quick in brackets):
 *   --quick              one link (1gbit), phases of 3 s, 4 connections, 512 MiB without cold memory:
 *                        a smoke, figures not meaningful
 *   --ram-mib 1024 [512] guest RAM
 *   --cold-mib 640 [0]   cold memory (tether.cold_mib= of tools/guest/debian/tether-init)
 *   --links 1gbit,200mbit
 *   --phase-s 10 [3]     length of the before and after phases
 *   --conns 8 [4]        connections per memcached and nginx client
 *   --plot FILE [--out F] only draw the plot of a saved run (default out: bench-results/apps.svg)
 *
 * `npm run bench -- --quick` (the CI smoke of `npm test`) does not run this benchmark: it
 * runs the disk bench and the suite only; this one boots four Debian VMs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../lab/cluster.ts';
import { GUEST_IP, ROOT } from '../../lab/topology.ts';
import { fileSize } from '../../lab/proc.ts';
import { DEBIAN_RAM_MIB, debianGuest, waitServices } from '../../lab/apps/debian.ts';
import { createTable, PgWriter } from '../../lab/apps/pg.ts';
import { loadVmConfig } from '../../src/config/load.ts';
import { percentile } from '../../src/util/time.ts';
import { num, str } from './args.ts';
import {
  digestLogs,
  killVanilla,
  LINKS,
  log,
  MiB,
  r2,
  shapeLink,
  startVanillaQemu,
  withTimeout,
  type Link,
  type Rec,
  type VQemu,
} from './lib.ts';
import { markdownTable, writeSvg, type Figure } from './report.ts';
import { appsThroughputSpec } from './apps-plot.ts';
import { stallAround } from './stall.ts';

const quick = process.argv.includes('--quick');
const links = str('links', quick ? '1gbit' : '1gbit,200mbit').split(',') as Link[];
for (const l of links) if (!(l in LINKS)) throw new Error(`--links: unknown link ${l} (${Object.keys(LINKS).join(', ')})`);
const PHASE_MS = num('phase-s', quick ? 3 : 10) * 1000;
const CONNS = num('conns', quick ? 4 : 8);
const RAM_MIB = num('ram-mib', quick ? DEBIAN_RAM_MIB : 1024);
const COLD_MIB = num('cold-mib', quick ? 0 : 640);
const INTERVAL_MS = 50;
const UNLIMITED_BW = 10 * 1024 * MiB;
const VANILLA_PORT = 49_300;
/** Deadlines only keep a broken run from hanging; they are not performance limits. */
const MIGRATE_DEADLINE_MS = 600_000;
const LOAD_CLIENT = path.join(ROOT, 'tools', 'bench', 'apps-load.ts');
const OUT_DIR = path.join(ROOT, 'bench-results');
const STARTED = new Date().toISOString();
const PLOT_TITLE = 'Requests per second around the post-copy window: tether vs vanilla QEMU post-copy';

// --plot FILE: draw the plot of a saved run (bench-results/apps-<time>.json) and stop.
const plotFrom = str('plot', '');
if (plotFrom) {
  const out = str('out', path.join(OUT_DIR, 'apps.svg'));
  const saved = JSON.parse(fs.readFileSync(plotFrom, 'utf8')) as { runs: Parameters<typeof appsThroughputSpec>[0] };
  await writeSvg(out, appsThroughputSpec(saved.runs, PLOT_TITLE));
  console.log(`wrote ${out}`);
  process.exit(0);
}

type Strategy = 'vanilla-postcopy' | 'tether-50';
type Workload = 'memcached' | 'nginx' | 'postgresql';
type Phase = 'before' | 'during' | 'after';
const WORKLOADS: Workload[] = ['memcached', 'nginx', 'postgresql'];
const PHASES: Phase[] = ['before', 'during', 'after'];

interface Stats {
  ops: number;
  seconds: number;
  perSecond: number | null;
  p50Ms: number | null;
  p99Ms: number | null;
}
interface Run {
  strategy: Strategy;
  link: Link;
  ok: boolean;
  error?: string;
  /** Wall-clock ms (epoch) of the phases' bounds. */
  windows: Partial<Record<Phase, [number, number]>>;
  totalMs: number | null;
  stats: Partial<Record<Workload, Partial<Record<Phase, Stats>>>>;
  /**
   * Per workload, the client-visible stall at the start of the window: the longest silence
   * between completed requests from the last one before the destination resumed over the
   * next 50 (tools/bench/stall.ts), ms.
   */
  stallMs: Partial<Record<Workload, number | null>>;
  /** Requests that failed (connection errors, wrong answers), per workload. */
  errors: Partial<Record<Workload, number>>;
  errorSamples: string[];
}

/** A load client (apps-load.ts) in the client namespace: its completed requests as [end ms, latency ms]. */
class Load {
  readonly proc: ChildProcess;
  readonly done: [number, number][] = [];
  readonly errors: string[] = [];
  #buf = '';
  constructor(c: Cluster, kind: 'memcached' | 'nginx') {
    const args = ['netns', 'exec', c.clientNs, process.execPath, '--import', 'tsx', LOAD_CLIENT];
    this.proc = spawn('ip', [...args, '--kind', kind, '--host', GUEST_IP, '--conns', String(CONNS)], {
      stdio: ['pipe', 'pipe', 'pipe'],
      cwd: ROOT,
    });
    this.proc.stdout!.on('data', (d: Buffer) => {
      this.#buf += d.toString('latin1');
      let nl;
      while ((nl = this.#buf.indexOf('\n')) >= 0) {
        const line = this.#buf.slice(0, nl);
        this.#buf = this.#buf.slice(nl + 1);
        if (line.startsWith('E ')) this.errors.push(line);
        else {
          const [t, lat] = line.split(' ').map(Number);
          if (Number.isFinite(t) && Number.isFinite(lat)) this.done.push([t!, lat!]);
        }
      }
    });
    this.proc.stderr!.on('data', (d: Buffer) => this.errors.push(`stderr: ${d.toString('utf8').trim()}`));
    this.proc.stdin!.on('error', (e) => this.errors.push(`stdin: ${e.message}`));
  }
  async stop(): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const exited = new Promise((resolve) => this.proc.once('exit', resolve));
    this.proc.stdin!.end();
    const timer = setTimeout(() => this.kill(), 5000);
    await exited;
    clearTimeout(timer);
  }
  kill(): void {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
  }
}

function stats(done: [number, number][], [from, to]: [number, number]): Stats {
  const lat = done.filter(([t]) => t >= from && t < to).map(([, l]) => l);
  const seconds = (to - from) / 1000;
  return {
    ops: lat.length,
    seconds: r2(seconds),
    perSecond: seconds > 0 ? r2(lat.length / seconds) : null,
    p50Ms: lat.length ? r2(percentile(lat, 50)) : null,
    p99Ms: lat.length ? r2(percentile(lat, 99)) : null,
  };
}

function clusterFor(strategy: Strategy): Cluster {
  const g = debianGuest();
  return new Cluster({
    guestNet: strategy === 'tether-50' ? 'gate' : 'qemu-tap',
    boot: { kernel: g.kernel, initrd: g.initrd, append: 'console=ttyS0 root=/dev/vda rw quiet panic=-1' },
    disk: { guest: 'os', image: g.image },
    vm: {
      memoryMiB: RAM_MIB,
      intervalMs: INTERVAL_MS,
      maxBandwidth: UNLIMITED_BW,
      hotStandby: true,
      ...(COLD_MIB > 0 ? { appendExtra: `tether.cold_mib=${COLD_MIB}` } : {}),
    },
  });
}

/** Migrate with tether; the post-copy window from the daemons' logs (destination QEMU resumed → completed). */
async function migrateTether(c: Cluster): Promise<{ window: [number, number]; totalMs: number }> {
  const offsets = { src: fileSize(c.src.daemonLog), dst: fileSize(c.dst.daemonLog) };
  const t0Wall = Date.now();
  const mig = await withTimeout(c.migrate(), MIGRATE_DEADLINE_MS, 'tether migrate');
  if (mig.code !== 0 || mig.result?.outcome !== 'completed') throw new Error(`tether migrate exit ${mig.code}: ${mig.stderr.slice(-1500)}`);
  await sleep(300); // the daemons' last log lines
  const d = digestLogs(c, offsets, t0Wall);
  const running = d.qemuResumeAt ?? d.phases.find((p) => p.host === 'host-d' && p.msg.endsWith('-> running'))?.atMs;
  const done = d.phases.find((p) => p.host === 'host-s' && p.msg.endsWith('-> completed'))?.atMs;
  if (running === undefined || done === undefined) throw new Error('the daemons logged no resume or completion');
  return { window: [t0Wall + running, t0Wall + done], totalMs: Number(mig.result.totalMs) };
}

/** Vanilla QEMU post-copy, as the suite's (tools/bench/suite.ts): the window is the destination's RESUME → source completed. */
async function migrateVanilla(c: Cluster, src: VQemu, setDst: (q: VQemu) => void): Promise<{ window: [number, number]; totalMs: number }> {
  const vm = loadVmConfig(c.vmConfig);
  const t0 = Date.now();
  const dst = await startVanillaQemu(c, c.dst, vm, 'dst', c.dir, { kind: 'defer' });
  setDst(dst);
  const caps = { capabilities: [{ capability: 'postcopy-ram', state: true }] };
  await dst.qmp.execute('migrate-set-capabilities', caps);
  const uri = `tcp:${c.dst.addr}:${VANILLA_PORT}`;
  await dst.qmp.execute('migrate-incoming', { uri });
  await src.qmp.execute('migrate-set-capabilities', caps);
  await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BW, 'max-postcopy-bandwidth': UNLIMITED_BW });
  let resumeAt: number | null = null;
  dst.qmp.on('event', (name, _d, ts) => {
    if (name === 'RESUME' && resumeAt === null) resumeAt = ts.seconds * 1000 + ts.microseconds / 1000;
  });
  await src.qmp.execute('migrate', { uri });
  await src.qmp.execute('migrate-start-postcopy');
  const deadline = Date.now() + MIGRATE_DEADLINE_MS;
  for (;;) {
    const m = (await src.qmp.execute('query-migrate')) as Rec;
    if (m.status === 'completed') break;
    if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`vanilla migration ${m.status}: ${m['error-desc'] ?? ''}`);
    if (Date.now() > deadline) throw new Error('vanilla post-copy did not complete');
    await sleep(10);
  }
  const end = Date.now();
  for (let i = 0; i < 300 && resumeAt === null; i++) await sleep(10);
  if (resumeAt === null) throw new Error('no RESUME event from the destination QEMU');
  return { window: [resumeAt, end], totalMs: end - t0 };
}

async function runOne(strategy: Strategy, link: Link): Promise<Run> {
  const run: Run = { strategy, link, ok: false, windows: {}, totalMs: null, stats: {}, stallMs: {}, errors: {}, errorSamples: [] };
  const label = `${strategy} ${link}`;
  const c = clusterFor(strategy);
  let src: VQemu | undefined;
  let dst: VQemu | undefined;
  const loads: Partial<Record<'memcached' | 'nginx', Load>> = {};
  let pg: PgWriter | undefined;
  try {
    await c.up();
    shapeLink(c, link);
    let serial: string;
    if (strategy === 'tether-50') {
      const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
      if (r.code !== 0) throw new Error(`tether vm start: ${r.stderr}`);
      serial = c.serialLog(c.src);
    } else {
      src = await startVanillaQemu(c, c.src, loadVmConfig(c.vmConfig), 'src', c.dir);
      serial = src.serialLog;
    }
    await waitServices(serial, 0);
    log(`${label}: services up, load on`);
    createTable(c);
    pg = new PgWriter(c);
    loads.memcached = new Load(c, 'memcached');
    loads.nginx = new Load(c, 'nginx');
    await sleep(2000 + PHASE_MS); // warm-up, then the before phase
    const before: [number, number] = [Date.now() - PHASE_MS, Date.now()];
    log(`${label}: migrating`);
    const m = strategy === 'tether-50' ? await migrateTether(c) : await migrateVanilla(c, src!, (q) => (dst = q));
    run.totalMs = r2(m.totalMs);
    log(`${label}: completed, post-copy window ${((m.window[1] - m.window[0]) / 1000).toFixed(1)} s`);
    const after: [number, number] = [m.window[1] + 1000, m.window[1] + 1000 + PHASE_MS];
    await sleep(Math.max(0, after[1] - Date.now()) + 200);
    run.windows = { before, during: m.window, after };
    await Promise.all([loads.memcached.stop(), loads.nginx.stop()]);
    const pgDone: [number, number][] = pg.acked.map((a) => [a.t, a.t - (pg!.sentAt.get(a.id) ?? a.t)]);
    const series: Record<Workload, [number, number][]> = {
      memcached: loads.memcached.done,
      nginx: loads.nginx.done,
      postgresql: pgDone,
    };
    for (const w of WORKLOADS) {
      run.stats[w] = {};
      for (const p of PHASES) run.stats[w]![p] = stats(series[w], run.windows[p]!);
      const stall = stallAround(
        series[w].map(([t]) => t),
        m.window[0],
      ).ms;
      run.stallMs[w] = stall === null ? null : r2(stall);
    }
    run.errors = { memcached: loads.memcached.errors.length, nginx: loads.nginx.errors.length, postgresql: pg.errors.length };
    run.errorSamples = [...loads.memcached.errors.slice(0, 3), ...loads.nginx.errors.slice(0, 3), ...pg.errors.slice(0, 3)];
    run.ok = true;
  } catch (e) {
    run.error = (e as Error).stack ?? String(e);
    log(`${label} failed: ${(e as Error).message}`);
  } finally {
    loads.memcached?.kill();
    loads.nginx?.kill();
    pg?.kill();
    await killVanilla(src);
    await killVanilla(dst);
    await c.cleanup();
  }
  return run;
}

const fmt = (v: number | null | undefined, d = 1): string => (v === null || v === undefined ? '–' : v.toFixed(d));

function tables(runs: Run[]): { text: string; figures: Figure[] } {
  const lines = [
    '| link | strategy | workload | before /s | p50 | p99 | during /s | p50 | p99 | after /s | p50 | p99 | window s | stall s |',
    '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ];
  for (const r of runs) {
    if (!r.ok) {
      lines.push(`| ${r.link} | ${r.strategy} | (failed: ${(r.error ?? '').split('\n')[0]!.slice(0, 100)}) |||||||||||`);
      continue;
    }
    const win = r.windows.during ? (r.windows.during[1] - r.windows.during[0]) / 1000 : null;
    for (const w of WORKLOADS) {
      const s = r.stats[w]!;
      const cells = PHASES.flatMap((p) => [fmt(s[p]?.perSecond), fmt(s[p]?.p50Ms), fmt(s[p]?.p99Ms)]);
      const stall = r.stallMs[w];
      lines.push(`| ${r.link} | ${r.strategy} | ${w} | ${cells.join(' | ')} | ${fmt(win)} | ${fmt(stall == null ? null : stall / 1000)} |`);
    }
  }
  const figures: Figure[] = [];
  for (const link of links) {
    const t = runs.find((r) => r.ok && r.link === link && r.strategy === 'tether-50');
    const v = runs.find((r) => r.ok && r.link === link && r.strategy === 'vanilla-postcopy');
    for (const w of ['memcached', 'nginx'] as const) {
      const a = t?.stats[w]?.during?.perSecond ?? null;
      const b = v?.stats[w]?.during?.perSecond ?? null;
      figures.push({
        name: `${w} throughput in the post-copy window, tether / vanilla post-copy (${link})`,
        value: a !== null && b ? r2(a / b) : null,
        unit: '×',
        target: { op: '>=', value: 0.5 },
        note: `${fmt(a)} / ${fmt(b)} requests/s, ${CONNS} connections`,
      });
    }
    const pg = t?.stats.postgresql?.during;
    figures.push({
      name: `PostgreSQL commit latency p50 in the post-copy window, tether (${link})`,
      value: pg?.p50Ms ?? null,
      unit: 'ms',
      note: `p99 ${fmt(pg?.p99Ms)} ms, ${pg?.ops ?? 0} commits; checkpoint epoch period ${INTERVAL_MS} ms (p50 = ${fmt(pg?.p50Ms ? pg.p50Ms / INTERVAL_MS : null, 2)} periods); vanilla: p50 ${fmt(v?.stats.postgresql?.during?.p50Ms)} ms`,
    });
  }
  return { text: lines.join('\n'), figures };
}

// ------------------------------------------------------------------ main

debianGuest();
const runs: Run[] = [];
for (const link of links)
  for (const strategy of ['vanilla-postcopy', 'tether-50'] as Strategy[]) {
    log(`${strategy} ${link}: start`);
    runs.push(await runOne(strategy, link));
  }
const { text, figures } = tables(runs);
const head = [
  `# Real applications across post-copy: tether vs vanilla QEMU post-copy${quick ? ' (quick: not meaningful)' : ''}`,
  '',
  `${STARTED}; Debian guest ${RAM_MIB} MiB, ${COLD_MIB} MiB of it cold memory; memcached and nginx: ${CONNS} closed-loop connections each; PostgreSQL: one psql connection, ` +
    `one INSERT transaction at a time; all three at once. Phases: before = ${PHASE_MS / 1000} s before the migrate request, during = the ` +
    `post-copy window (destination QEMU resumed → completed), after = ${PHASE_MS / 1000} s from 1 s after completion. Requests/s and latency ` +
    'p50/p99 (ms) of the requests that completed in each phase. tether: checkpoint interval 50 ms, gate on the NIC, disk through the sidecar; ' +
    'vanilla: QEMU TAP, the image shared by both QEMUs. stall = the longest silence between completed requests from the last one ' +
    'before the destination resumed over the next 50 (it starts the window, and in a short window it is most of it).',
  '',
];
const md = [...head, text, '', markdownTable(figures), ''].join('\n');
process.stdout.write(md);
const json = JSON.stringify(
  { started: STARTED, quick, phaseMs: PHASE_MS, conns: CONNS, ramMiB: RAM_MIB, coldMiB: COLD_MIB, intervalMs: INTERVAL_MS, runs, figures },
  null,
  2,
);
fs.mkdirSync(OUT_DIR, { recursive: true });
fs.writeFileSync(path.join(OUT_DIR, `apps${quick ? '-quick' : ''}-${STARTED.replaceAll(':', '').replace(/\.\d+Z$/, 'Z')}.json`), json);
fs.writeFileSync(path.join(OUT_DIR, 'apps.json'), json);
fs.writeFileSync(path.join(OUT_DIR, 'apps.md'), md);
await writeSvg(path.join(OUT_DIR, 'apps.svg'), appsThroughputSpec(runs, PLOT_TITLE));
if (runs.some((r) => !r.ok)) process.exitCode = 1;
