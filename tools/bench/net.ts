/**
 * Network benchmark: `npm run bench net [-- options]` (root; network namespaces, real
 * QEMU TCG). Run it under the machine-wide lock:
 *   flock /tmp/tether-qemu.lock npm run bench net [-- --quick]
 *
 * Two clusters of the lab (lab/cluster.ts), booted side by side and
 * both alive for the whole run, so each measurement sees the same background load:
 *   tap:  the guest's NIC is QEMU's own `-netdev tap` on the host bridge (vanilla baseline);
 *         QEMU's default vnet_hdr gives the guest checksum and segmentation offloads;
 *   tap-novnet: the same with vnet_hdr=off: no offloads (a reference: what the offloads are worth);
 *   gate: the guest's NIC is the VM config's `nics`: tether's steady state (QEMU's tap with
 *         vnet_hdr on the sidecar's persistent TAP, nothing through the sidecar) before and
 *         after the migration, and the destination's window (filter-redirectors → relay →
 *         gate → tap) in between (TCP there with --gated-sizes).
 * The guest runs netcheck (tools/guest/netcheck.c) and a slow memcheck; the client
 * namespace pings it (busybox ping: the guest kernel answers ICMP) and moves bulk TCP
 * through netcheck (lab/net/bulk-client.ts: B = guest → client, S = client → guest),
 * transfers of each --sizes one after another for --tcp-seconds.
 *
 * Phases of the gate cluster, all in one run:
 *   before   VM on the source, gate in pass-through (compared with the tap cluster)
 *   gated    for each --intervals value: migrate with that checkpoint interval (written
 *            into the destination's VM config, which is what the destination runs), wait
 *            until D has had checkpoint --warmup-epochs acknowledged, then ping in chunks
 *            while the post-copy window is open (a slow QEMU max-bandwidth, --bandwidth-mib,
 *            keeps it open ~20 s for a 256 MiB guest): the first --warmup-chunks chunks are
 *            a warm-up (the guest faults its working set in), a chunk counts only if the
 *            source still reports post-copy after it, so every counted reply left through
 *            the gated gate; then `tether abort` (rollback to the source) — except the last
 *            interval, whose migration completes
 *   after    VM on the destination after completion, gate in pass-through
 * Beside each in-window RTT: the gate's expected floor and bound from the checkpoint
 * timings of the same seconds (both daemons' logs), the share of replies later than the
 * bound and the post-copy page requests QEMU counted meanwhile (the faults' share).
 *
 * Prints figures beside targets (PASS/MISS are findings, not test failures) and writes
 * bench-results/net-<time>/ (net.json, summary.md, SVG plots, logs/) and the latest run
 * at bench-results/net.json and net.md.
 *
 * Options (defaults; --quick in brackets, for the CI smoke bench):
 *   --ping-count 400 [25]      pings per sample outside the window, every --ping-interval-ms 20
 *   --gated-ping-count 400 [50]  counted pings per in-window sample, in chunks of
 *                              --ping-chunk 100 [25], after --warmup-chunks 1 and
 *                              --warmup-epochs 5 (D's ackedEpoch)
 *   --tcp-seconds 3 [1]        per direction and size
 *   --gated-sizes (none), --gated-tcp-seconds 2 [1]
 *                              opt-in TCP inside the post-copy window, after the ping, e.g.
 *                              --gated-sizes 65536 (flagged if the window closed meanwhile)
 *   --sizes 65536,4194304 [4194304]   bytes per transfer (64 KiB: request-sized, 4 MiB: bulk)
 *   --intervals 25,50,100 [50] checkpoint intervals of the gated samples
 *   --bandwidth-mib 4 [16]     QEMU max-bandwidth of the migrations (post-copy window length)
 *   --guest-mib 256            guest RAM
 *   --only tap,tap-novnet,gate [tap,gate]   run a subset; `--only rtt`: the gate cluster's
 *                              ping RTT alone (no TCP), each interval first with the
 *                              destination's gate forced open (TETHER_FAULTS=gate-open: the
 *                              window without the gate's hold), then gated; about 3 minutes
 *   --no-control               --only rtt without the forced-open migrations
 *   --control                  also sample each window with the gate forced open (the relay without the hold)
 *   --only stall               the client-visible stall after switchover, tether beside vanilla QEMU post-copy
 *                              (tools/bench/stall.ts): a netclient queries every 20 ms; stall = last answer at or
 *                              before the source's STOP of the switchover → first answer after it; median of
 *                              --stall-repeats 5 migrations of each per --stall-links 200mbit,1gbit (tbf on the
 *                              migration link, QEMU unthrottled); tether's runs are aborted a second after the
 *                              switchover (hold-completion), vanilla's go back and forth; about 2 minutes
 *   --gated-links 1gbit,200mbit   run the in-window samples (control and gated) once per migration link setting
 *                              (tbf on the migration link, both directions, as --stall-links), side by side in one
 *                              run; default: the link unshaped (one setting)
 *   --hold-window              the destination asks to complete only after the last sample (hold-completion):
 *                              with a fast --bandwidth-mib all RAM has moved, so the window is measured
 *                              without post-copy faults (the relay and the gate's hold alone)
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../lab/cluster.ts';
import { fileSize, waitFor } from '../../lab/proc.ts';
import { GUEST_IP, NETCHECK_PORT, ROOT, type Host } from '../../lab/topology.ts';
import { type NetClient } from '../../lab/net/driver.ts';
import { percentile } from '../../src/util/time.ts';
import { arg, str } from './args.ts';
import { barsSpec, markdownTable, plotDir, type Figure } from './report.ts';
import { copyClusterLogs, killVanilla, LINKS, shapeLink, startVanillaQemu, type Link, type VQemu } from './lib.ts';
import { loadVmConfig } from '../../src/config/load.ts';
import { median, stallAround, largestGap, type StallFigure } from './stall.ts';

// ------------------------------------------------------------------ options

const quick = process.argv.includes('--quick');
const num = arg;
const list = (name: string, def: string): string[] => str(name, def).split(',').filter(Boolean);
const only = new Set(list('only', quick ? 'tap,gate' : 'tap,tap-novnet,gate'));
/** `--only rtt`: the gate cluster's ping RTT alone (no TCP, no tap clusters). */
const rttOnly = only.has('rtt');
if (rttOnly) only.add('gate');
const opt = {
  quick,
  pingCount: num('ping-count', quick ? 25 : 400),
  pingIntervalMs: num('ping-interval-ms', 20),
  tcpSeconds: num('tcp-seconds', quick ? 1 : 3),
  gatedPingCount: num('gated-ping-count', quick ? 50 : 400),
  pingChunk: num('ping-chunk', quick ? 25 : 100),
  warmupEpochs: num('warmup-epochs', 5),
  warmupChunks: num('warmup-chunks', 1),
  warmupMaxChunks: num('warmup-max-chunks', quick ? 1 : 3),
  gatedTcpSeconds: num('gated-tcp-seconds', quick ? 1 : 2),
  // TCP in the window is opt-in: it lengthens the in-window part beyond what the window lasts
  gatedSizes: list('gated-sizes', '').map(Number),
  sizes: list('sizes', quick ? '4194304' : '65536,4194304').map(Number),
  intervals: list('intervals', quick ? '50' : '25,50,100').map(Number),
  bandwidthMiB: num('bandwidth-mib', quick ? 16 : 3),
  guestMiB: num('guest-mib', 256),
  rttOnly,
  /** Also sample each window with the gate forced open (default with --only rtt; --no-control skips it). */
  control: (rttOnly && !process.argv.includes('--no-control')) || process.argv.includes('--control'),
  /** The destination does not ask to complete until the last sample is taken: a fast link moves all RAM, then the window stays open without post-copy faults. */
  holdWindow: process.argv.includes('--hold-window'),
  /** --only stall: migration links (tbf) of the two settings, and migrations per setting and side. */
  stallLinks: list('stall-links', '200mbit,1gbit') as Link[],
  stallRepeats: num('stall-repeats', 5),
  /** Migration link settings (tbf) of the in-window samples; empty: the link unshaped. */
  gatedLinks: list('gated-links', '') as Link[],
  only,
};
for (const l of opt.gatedLinks) if (!(l in LINKS)) throw new Error(`--gated-links: one of ${Object.keys(LINKS).join(', ')}`);
for (const l of opt.stallLinks) if (!(l in LINKS)) throw new Error(`--stall-links: one of ${Object.keys(LINKS).join(', ')}`);
for (const v of [...opt.sizes, ...opt.intervals])
  if (!Number.isInteger(v) || v <= 0) throw new Error('--sizes/--intervals: positive integers');

const MiB = 1024 * 1024;
/** Steady state (QEMU's tap on the sidecar's TAP, no relay) relative to a plain `-netdev tap,vnet_hdr=on` (issue 16). */
const TARGET_RATIO = 0.95;
/** Inside the destination's window (filter-redirectors, relay, gate) relative to a plain tap (issue 16). */
const TARGET_GATED_RATIO = 0.8;
const OUT_DIR = path.join(ROOT, 'bench-results');
const STARTED = new Date().toISOString();
const RUN_DIR = path.join(OUT_DIR, `net-${STARTED.replaceAll(':', '').replace(/\.\d+Z$/, 'Z')}`);
const LOG_DIR = path.join(RUN_DIR, 'logs');
const CLIENT = path.join(ROOT, 'lab', 'net', 'bulk-client.ts');
const PING_WAIT_S = 3;

const now = (): number => performance.now();
const r2 = (v: number): number => Math.round(v * 100) / 100;
function log(s: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 23)}] ${s}\n`);
}

function run(cmd: string, args: string[], timeoutMs: number): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 16 * MiB }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code ?? 1) : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

// ------------------------------------------------------------------ measurements

interface PingStats {
  sent: number;
  received: number;
  /** icmp_seq of requests without a reply. */
  missing: number[];
  p50: number | null;
  p99: number | null;
  max: number | null;
  /** Every reply's RTT in order, ms (kept in the JSON for a later look). */
  rtts: number[];
}

function pingStats(count: number, rtts: number[], missing: number[]): PingStats {
  return {
    sent: count,
    received: rtts.length,
    missing,
    p50: rtts.length ? r2(percentile(rtts, 50)) : null,
    p99: rtts.length ? r2(percentile(rtts, 99)) : null,
    max: rtts.length ? r2(Math.max(...rtts)) : null,
    rtts,
  };
}

/** busybox ping from the client namespace; RTTs from its per-reply lines (ms, 3 decimals). */
async function ping(c: Cluster, count: number, intervalMs: number): Promise<PingStats> {
  // -W: after the last request, wait this long for outstanding replies (gated ones take
  // an epoch or more); later replies count as lost.
  const r = await run(
    'ip',
    [
      'netns',
      'exec',
      c.clientNs,
      'busybox',
      'ping',
      '-c',
      String(count),
      '-i',
      String(intervalMs / 1000),
      '-W',
      String(PING_WAIT_S),
      GUEST_IP,
    ],
    count * intervalMs + PING_WAIT_S * 1000 + 30_000,
  );
  const replies = [...r.stdout.matchAll(/seq=(\d+) .*time=([\d.]+) ms/g)].map((m) => ({ seq: Number(m[1]), ms: Number(m[2]) }));
  const rtts = replies.map((x) => x.ms);
  const got = new Set(replies.map((x) => x.seq));
  return pingStats(
    count,
    rtts,
    Array.from({ length: count }, (_, i) => i).filter((i) => !got.has(i)),
  );
}

interface TcpResult {
  dir: 'g2c' | 'c2g';
  size: number;
  mbitPerS: number | null;
  transfers?: number;
  bytes?: number;
  seconds?: number;
  transferMs?: { p50: number; p99: number };
  /** CPU of the VM's QEMU and of the sidecar of its host during the transfers, % of one core. */
  cpu?: { qemuPct: number | null; sidecarPct: number | null };
  error?: string;
}

async function tcp(c: Cluster, dir: 'g2c' | 'c2g', size: number, seconds: number): Promise<TcpResult> {
  const r = await run(
    'ip',
    [
      'netns',
      'exec',
      c.clientNs,
      process.execPath,
      '--import',
      'tsx',
      CLIENT,
      '--host',
      GUEST_IP,
      '--port',
      String(NETCHECK_PORT),
      '--dir',
      dir,
      '--size',
      String(size),
      '--seconds',
      String(seconds),
    ],
    (seconds + 60) * 1000,
  );
  try {
    const j = JSON.parse(r.stdout.trim().split('\n').pop() ?? '') as Omit<TcpResult, 'dir' | 'size'> & { error?: string };
    if (j.error) return { dir, size, mbitPerS: null, error: j.error };
    return { ...j, dir, size };
  } catch {
    return { dir, size, mbitPerS: null, error: `net-client exit ${r.code}: ${r.stderr.slice(-500)}` };
  }
}

interface Sample {
  label: string;
  ping: PingStats;
  tcp: TcpResult[];
  ms: number;
}

/** utime + stime of a process in seconds (/proc/<pid>/stat; 100 ticks/s), null when gone. */
function cpuSeconds(pid: number | undefined): number | null {
  if (!pid) return null;
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch {
    return null;
  }
}

/** CPU used by the VM's QEMU and the host's sidecar during `fn`, as % of one core. */
async function withCpu<T>(
  c: Cluster,
  h: Host,
  fn: () => Promise<T>,
): Promise<T & { cpu: { qemuPct: number | null; sidecarPct: number | null } }> {
  const qpid = Number((await c.status(h)).pid) || undefined;
  const dpid = h.daemon?.pid;
  const q0 = cpuSeconds(qpid);
  const d0 = cpuSeconds(dpid);
  const t0 = now();
  const r = await fn();
  const dt = (now() - t0) / 1000;
  const q1 = cpuSeconds(qpid);
  const d1 = cpuSeconds(dpid);
  const pct = (a: number | null, b: number | null): number | null => (a === null || b === null ? null : Math.round(((b - a) / dt) * 100));
  return { ...r, cpu: { qemuPct: pct(q0, q1), sidecarPct: pct(d0, d1) } };
}

interface SampleSpec {
  pingCount: number;
  sizes: number[];
  tcpSeconds: number;
}
const FULL = (): SampleSpec => ({ pingCount: opt.pingCount, sizes: opt.rttOnly ? [] : opt.sizes, tcpSeconds: opt.tcpSeconds });

async function tcpSamples(c: Cluster, h: Host, label: string, sizes: number[], seconds: number): Promise<TcpResult[]> {
  const t: TcpResult[] = [];
  for (const dir of ['g2c', 'c2g'] as const) {
    for (const size of sizes) {
      const res = await withCpu(c, h, () => tcp(c, dir, size, seconds));
      log(
        `${label}: tcp ${dir} ${size} B: ${res.mbitPerS ?? res.error} Mbit/s (CPU: QEMU ${res.cpu.qemuPct}%, sidecar ${res.cpu.sidecarPct}%)`,
      );
      t.push(res);
    }
  }
  return t;
}

async function sample(c: Cluster, h: Host, label: string, spec: SampleSpec = FULL()): Promise<Sample> {
  const t0 = now();
  const p = await ping(c, spec.pingCount, opt.pingIntervalMs);
  log(`${label}: ping p50 ${p.p50} ms p99 ${p.p99} ms (${p.received}/${p.sent})`);
  const t = await tcpSamples(c, h, label, spec.sizes, spec.tcpSeconds);
  return { label, ping: p, tcp: t, ms: r2(now() - t0) };
}

// ------------------------------------------------------------------ clusters

const TAPS = {
  tap: { label: 'QEMU tap', vnetHdr: true },
  'tap-novnet': { label: 'QEMU tap, vnet_hdr=off', vnetHdr: false },
} as const;
type TapKind = keyof typeof TAPS;

function clusterFor(guestNet: 'qemu-tap' | 'gate', intervalMs: number, tapVnetHdr = true): Cluster {
  return new Cluster({
    guestNet,
    tapVnetHdr,
    ...(guestNet === 'gate' && opt.holdWindow ? { holdCompletion: true } : {}),
    // the gate's release log (docs/network.md): when each epoch's frames left, for gateModel
    ...(guestNet === 'gate' ? { env: { TETHER_GATE_LOG: '1' } } : {}),
    vm: {
      // a light memcheck: the guest's CPU goes to the network, memory still changes
      memcheckMiB: 4,
      memcheckMBps: 1,
      memoryMiB: opt.guestMiB,
      intervalMs,
      maxBandwidth: Math.round(opt.bandwidthMiB * MiB),
      // no hot standby: this bench measures no restore, and a standby QEMU's start would share
      // the two cores with the window it measures
      hotStandby: false,
    },
  });
}

async function boot(c: Cluster, what: string): Promise<number> {
  const t0 = now();
  const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
  if (r.code !== 0) throw new Error(`${what}: tether vm start failed: ${r.stderr}`);
  await waitReachable(c, `${what}: the guest answers ping`);
  await waitFor(() => /netcheck listening/.test(readText(c.serialLog(c.src))), `${what}: netcheck listening`, 120_000);
  log(`${what}: booted in ${Math.round(now() - t0)} ms`);
  return r2(now() - t0);
}

async function waitReachable(c: Cluster, what: string): Promise<void> {
  await waitFor(async () => (await ping(c, 1, 100)).received === 1, what, 180_000);
}

function readText(p: string): string {
  try {
    return fs.readFileSync(p, 'latin1');
  } catch {
    return '';
  }
}

type Rec = Record<string, any>;
function records(file: string, from = 0): Rec[] {
  const out: Rec[] = [];
  for (const line of readText(file).slice(from).split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      out.push(JSON.parse(line) as Rec);
    } catch {
      /* partial line */
    }
  }
  return out;
}

async function migStatus(c: Cluster, h: Host): Promise<Rec> {
  return ((await c.status(h)).migration ?? {}) as Rec;
}

/** Rewrite checkpoint.intervalMs in a host's VM config (a destination runs its own config). */
function setCheckpointInterval(c: Cluster, h: Host, intervalMs: number): void {
  const file = path.join(h.vmConfigDir, `${c.vmName}.yaml`);
  fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace(/intervalMs: \d+/, `intervalMs: ${intervalMs}`));
}

function keepLogs(c: Cluster, label: string): void {
  const dir = path.join(LOG_DIR, label);
  fs.mkdirSync(dir, { recursive: true });
  copyClusterLogs(c, dir);
}

/** p50/p99 of a list (null when empty), 2 decimals. */
function dist(v: number[]): { p50: number | null; p99: number | null; n: number } {
  return { p50: v.length ? r2(percentile(v, 50)) : null, p99: v.length ? r2(percentile(v, 99)) : null, n: v.length };
}

interface GatedSample {
  label: string;
  intervalMs: number;
  /** The migration link's shaping during the sample (--gated-links), null: unshaped. */
  link: Link | null;
  /** Replies to requests of the chunks that ended with the window still open: the figure. */
  ping: PingStats;
  /** The first chunk after the wait, not counted: it faults in the reply path's pages. */
  warmup: PingStats | null;
  /** Requests of a chunk that ended after the window had closed: discarded, not counted. */
  discarded: number;
  /** The window stayed open until the last counted chunk ended (else fewer samples than asked). */
  windowOpen: boolean;
  /** Wall-clock span of the counted chunks, ms. */
  sampleMs: number;
  /** TCP transfers right after the ping, in the window too (not in --only rtt). */
  tcp: TcpResult[];
  tcpWindowOpen: boolean | null;
  /** Destination checkpoints taken during the counted chunks (daemon logs). */
  epochs: number;
  /** VM paused for the checkpoint, ms. */
  pauseMs: { p50: number | null; p99: number | null; n: number };
  /** Checkpoint taken → fully sent to the source, after the pause, ms. */
  sendMs: { p50: number | null; p99: number | null; n: number };
  /** Checkpoint sent (D's log) → applied on the source, whose ACK follows at once (S's log), ms. */
  ackMs: { p50: number | null; p99: number | null; n: number };
  /** Time from one checkpoint to the next on the destination (interval + pause + what stretches it), ms. */
  periodMs: { p50: number | null; p99: number | null; n: number };
  /**
   * What the gate alone adds: a request arrives at a uniform point of the epoch period P
   * (the guest runs `interval`, then pauses for the checkpoint; a request arriving in the
   * pause is answered when the guest runs again); the reply leaves at the ACK of the epoch
   * it was produced in. So it waits until the next seal (P/2 on average, P at worst), then
   * the checkpoint pause, the send and the ACK round trip.
   * p50 ≈ P50/2 + pause p50 + send p50 + ACK p50; bound ≈ P99 + pause p99 + send p99 + ACK p99.
   */
  floorMs: { p50: number | null; bound: number | null };
  /** The gate's hold replayed from the logs (gateModel): its share of the RTT. */
  model: ReturnType<typeof gateModel> | null;
  /** model.max + the pass-through p99 before migration: a reply later than this was held by something else. */
  boundMs: number | null;
  /** Replies later than boundMs. */
  aboveBound: { n: number; pct: number | null };
  /** The warm-up before the counted chunks: how long, and the page requests meanwhile. */
  warmupMs: number;
  warmupPostcopyRequests: number | null;
  /** Pages the destination faulted on and asked the source for during the counted chunks (QEMU postcopy-requests). */
  postcopyRequests: number | null;
  /** The same over the whole migration. */
  postcopyRequestsTotal: number | null;
  outcome: string | null;
  /** The migrate CLI's stderr tail when the outcome is not the expected one. */
  migrateError?: string;
  migrateTotalMs: number | null;
  /** Post-copy window: switchover → completion (completing run only), ms. */
  windowMs?: number | null;
}

interface GateRun {
  bootMs: number;
  before?: Sample;
  gated: GatedSample[];
  /** The same in-window samples with the destination's gate forced open (--control). */
  control: GatedSample[];
  after?: Sample;
  error?: string;
}

/** Wait until the destination has had `epoch` checkpoints acknowledged (so the window has settled). */
async function waitAcked(c: Cluster, epoch: number, migrating: Promise<unknown>): Promise<void> {
  let ended = false;
  void migrating.finally(() => (ended = true));
  await waitFor(async () => {
    if (ended) throw new Error(`the migration ended before checkpoint ${epoch} was acknowledged: ${JSON.stringify(await migrating)}`);
    return ((await c.status(c.dst)).migration?.ackedEpoch ?? 0) >= epoch;
  }, `checkpoint ${epoch} acknowledged on the destination`);
}

/**
 * Ping in chunks while the post-copy window is open. A chunk counts when the source
 * still reports phase postcopy after its last reply: every reply of it then left the
 * destination through the gated gate (completion switches the gate to pass-through only
 * after the source has recorded it). The chunk during which the window closed is dropped.
 */
async function windowPing(
  c: Cluster,
  ended: () => boolean,
): Promise<{
  ping: PingStats;
  warmup: PingStats | null;
  warmupFrom: number;
  discarded: number;
  open: boolean;
  from: number | null;
  to: number | null;
}> {
  const rtts: number[] = [];
  const missing: number[] = [];
  let sent = 0;
  const warm: { rtts: number[]; sent: number; missing: number[] } = { rtts: [], sent: 0, missing: [] };
  let warmup: PingStats | null = null;
  let discarded = 0;
  let open = true;
  let from: number | null = null;
  let to: number | null = null;
  const warmupFrom = Date.now();
  while (sent < opt.gatedPingCount) {
    const n = warmup ? Math.min(opt.pingChunk, opt.gatedPingCount - sent) : opt.pingChunk;
    const t0 = Date.now();
    const p = await ping(c, n, opt.pingIntervalMs);
    const t1 = Date.now();
    if (ended() || (await migStatus(c, c.src)).phase !== 'postcopy') {
      discarded += n;
      open = false;
      break;
    }
    if (!warmup) {
      warm.rtts.push(...p.rtts);
      warm.missing.push(...p.missing.map((i) => i + warm.sent));
      warm.sent += n;
      // The warm-up lasts its minimum, then until a chunk is answered in full (the first
      // seconds after the switchover the guest stalls on post-copy faults), at most its maximum.
      const chunks = warm.sent / opt.pingChunk;
      if (chunks >= opt.warmupChunks && (p.received === n || chunks >= opt.warmupMaxChunks))
        warmup = pingStats(warm.sent, warm.rtts, warm.missing);
      continue;
    }
    rtts.push(...p.rtts);
    missing.push(...p.missing.map((i) => i + sent));
    sent += n;
    from ??= t0;
    to = t1;
  }
  return { ping: pingStats(sent, rtts, missing), warmup, warmupFrom, discarded, open, from, to };
}

/** Checkpoint timings of the destination during [from, to] (wall clock), from both daemons' logs. */
function epochTimings(c: Cluster, dstFrom: number, srcFrom: number, from: number, to: number) {
  const sent = records(c.dst.daemonLog, dstFrom).filter((r) => r.msg === 'checkpoint sent' && typeof r.pauseMs === 'number');
  const applied = new Map(
    records(c.src.daemonLog, srcFrom)
      .filter((r) => r.msg === 'checkpoint applied')
      .map((r) => [Number(r.epoch), Date.parse(String(r.t))]),
  );
  const inSample = sent.filter((r) => {
    const t = Date.parse(String(r.t));
    return t >= from && t <= to;
  });
  const at = inSample.map((r) => Date.parse(String(r.t)));
  const acks = inSample.flatMap((r) => {
    const a = applied.get(Number(r.epoch));
    return a === undefined ? [] : [a - Date.parse(String(r.t))];
  });
  return {
    epochs: inSample.length,
    pauseMs: dist(inSample.map((r) => Number(r.pauseMs))),
    sendMs: dist(inSample.map((r) => Number(r.sendMs ?? 0))),
    ackMs: dist(acks),
    periodMs: dist(at.slice(1).map((t, i) => t - at[i]!)),
  };
}

/**
 * Post-copy page requests between two wall-clock times, from the source's progress
 * records (every 500 ms, `t` in ms since its start). Their clock is placed on the wall
 * clock by the first record, printed right after S logs 'destination ready'.
 */
function postcopyRequestsBetween(c: Cluster, srcFrom: number, progress: Record<string, any>[], from: number, to: number): number | null {
  const ready = records(c.src.daemonLog, srcFrom).find((r) => r.msg === 'destination ready');
  const first = progress.find((p) => p.destination !== undefined);
  if (!ready || !first) return null;
  const base = Date.parse(String(ready.t)) - Number(first.t);
  const req = progress.filter((p) => typeof p.ram?.postcopyRequests === 'number');
  const at = (wall: number): number | null => {
    const before = req.filter((p) => base + Number(p.t) <= wall).at(-1);
    return before ? Number(before.ram.postcopyRequests) : null;
  };
  const a = at(from);
  const b = at(to);
  return b === null ? null : b - (a ?? 0);
}

/**
 * The gate's own hold, replayed from the logs of the same seconds: a request arriving at
 * time t is answered at once if the guest runs, or when it resumes if it is paused for a
 * checkpoint; the reply belongs to the epoch open at that moment (epoch k: from the seal
 * of k-1 to the seal of k, the VM stopped) and leaves when the gate releases k (its
 * release log; the source's 'checkpoint applied', just before its ACK, when k released
 * nothing). hold(t) = release(k) − t for t every --ping-interval-ms over the sample.
 * This is what a guest answering instantly would see: the gate's share of the RTT.
 */
function gateModel(
  c: Cluster,
  dstFrom: number,
  srcFrom: number,
  releaseLog: Rec[],
  from: number,
  to: number,
): {
  p50: number | null;
  p99: number | null;
  max: number | null;
  n: number;
  releasesLogged: number;
  /** Per checkpoint of the sample, ms after its start: seal, resume, applied on S, released by the gate. */
  epochs: { k: number; seal: number; cont: number; applied: number | null; released: number | null }[];
} {
  const ckpts = records(c.dst.daemonLog, dstFrom)
    .filter((r) => r.msg === 'checkpoint sent' && typeof r.pauseMs === 'number')
    .map((r) => {
      const cont = Date.parse(String(r.t)) - Number(r.sendMs ?? 0);
      // pauseMs runs from the stop request to the VM running again; the seal comes once it is stopped
      return { k: Number(r.epoch), seal: cont - Number(r.pauseMs) + Number(r.stopMs ?? 0), cont };
    })
    .sort((a, b) => a.k - b.k);
  const applied = new Map(
    records(c.src.daemonLog, srcFrom)
      .filter((r) => r.msg === 'checkpoint applied')
      .map((r) => [Number(r.epoch), Date.parse(String(r.t))]),
  );
  const released = new Map<number, number>();
  for (const r of releaseLog) if (r.t === 'release' && typeof r.at === 'number') released.set(Number(r.epoch), r.at);
  const holds: number[] = [];
  let logged = 0;
  for (let t = from; t <= to; t += opt.pingIntervalMs) {
    const i = ckpts.findIndex((x) => x.cont > t);
    if (i < 0) break;
    const ck = ckpts[i]!;
    const epoch = ck.seal <= t ? ck.k + 1 : ck.k;
    const produced = ck.seal <= t ? ck.cont : t;
    const rel = released.get(epoch) ?? applied.get(epoch);
    if (rel === undefined) continue;
    if (released.has(epoch)) logged++;
    holds.push(Math.max(rel, produced) - t);
  }
  const d = dist(holds);
  const rel = (v: number | undefined): number | null => (v === undefined ? null : r2(v - from));
  return {
    p50: d.p50,
    p99: d.p99,
    max: holds.length ? r2(Math.max(...holds)) : null,
    n: holds.length,
    releasesLogged: logged,
    epochs: ckpts
      .filter((x) => x.cont >= from && x.seal <= to)
      .map((x) => ({
        k: x.k,
        seal: r2(x.seal - from),
        cont: r2(x.cont - from),
        applied: rel(applied.get(x.k)),
        released: rel(released.get(x.k)),
      })),
  };
}

/**
 * One migration with `interval`: wait for D's progress, ping in the window, then abort
 * (unless `last`) and gather what the logs say about the same seconds. `control`: the
 * destination runs with TETHER_FAULTS=gate-open, so the same window without the gate's hold.
 */
async function windowRun(
  c: Cluster,
  interval: number,
  last: boolean,
  slackMs: number,
  control: boolean,
  link: Link | null,
): Promise<GatedSample> {
  const on = link ? `, link ${link}` : '';
  const label = control ? `gate forced open (control) ${interval} ms${on}` : `gate in window ${interval} ms${on}`;
  setCheckpointInterval(c, c.dst, interval);
  const dstFrom = fileSize(c.dst.daemonLog);
  const srcFrom = fileSize(c.src.daemonLog);
  log(`gate: migrating with interval ${interval} ms${last ? ' (completes)' : ' (aborted after sampling)'}`);
  const t0 = now();
  const startWall = Date.now();
  const migrating = c.migrate();
  let ended = false;
  void migrating.finally(() => (ended = true));
  await waitAcked(c, opt.warmupEpochs, migrating);
  if (opt.holdWindow) {
    // all RAM has arrived (the destination holds its completion request): the window without post-copy faults
    await waitFor(
      () => ended || /holding the completion request/.test(readText(c.dst.daemonLog).slice(dstFrom)),
      'the destination has received all RAM',
      180_000,
    );
  }
  const w = await windowPing(c, () => ended);
  // read now: a rollback removes the destination's VM directory
  const releaseLog = records(path.join(c.dst.stateDir, c.vmName, 'net0.gate.jsonl')).filter((r) => Number(r.at) >= startWall);
  log(
    `${label}: ping p50 ${w.ping.p50} ms p99 ${w.ping.p99} ms (n=${w.ping.received}/${w.ping.sent} in window, ` +
      `${w.discarded} discarded, warm-up p50 ${w.warmup?.p50 ?? '–'} ms)`,
  );
  let tcpRes: TcpResult[] = [];
  let tcpWindowOpen: boolean | null = null;
  if (!opt.rttOnly && opt.gatedSizes.length && w.open) {
    tcpRes = await tcpSamples(c, c.dst, label, opt.gatedSizes, opt.gatedTcpSeconds);
    tcpWindowOpen = !ended && (await migStatus(c, c.src)).phase === 'postcopy';
  }
  if (!last && !ended) {
    const a = await c.tether(c.src, ['abort', c.vmName]);
    if (a.code !== 0) log(`abort: ${a.stderr}`);
  }
  if (last && opt.holdWindow) c.releaseCompletion();
  const mig = await migrating;
  const outcome = (mig.result?.outcome as string | undefined) ?? null;
  const ep = w.from !== null && w.to !== null ? epochTimings(c, dstFrom, srcFrom, w.from, w.to) : null;
  const sum = (...v: (number | null | undefined)[]): number | null =>
    v.some((x) => x === null || x === undefined) ? null : r2(v.reduce<number>((s, x) => s + (x as number), 0));
  const floorMs = {
    p50: sum(ep?.periodMs.p50 == null ? null : ep.periodMs.p50 / 2, ep?.pauseMs.p50, ep?.sendMs.p50, ep?.ackMs.p50),
    bound: sum(ep?.periodMs.p99, ep?.pauseMs.p99, ep?.sendMs.p99, ep?.ackMs.p99),
  };
  // with the gate forced open nothing is held: no replay
  const model = !control && w.from !== null && w.to !== null ? gateModel(c, dstFrom, srcFrom, releaseLog, w.from, w.to) : null;
  // a reply later than the gate's longest hold plus the pass-through p99 was held by something else
  const boundMs = model?.max != null ? r2(model.max + slackMs) : null;
  const above = boundMs === null ? 0 : w.ping.rtts.filter((x) => x > boundMs).length;
  const g: GatedSample = {
    label,
    intervalMs: interval,
    link,
    ping: w.ping,
    warmup: w.warmup,
    discarded: w.discarded,
    windowOpen: w.open,
    sampleMs: w.from !== null && w.to !== null ? w.to - w.from : 0,
    tcp: tcpRes,
    tcpWindowOpen,
    epochs: ep?.epochs ?? 0,
    pauseMs: ep?.pauseMs ?? dist([]),
    sendMs: ep?.sendMs ?? dist([]),
    ackMs: ep?.ackMs ?? dist([]),
    periodMs: ep?.periodMs ?? dist([]),
    floorMs,
    model,
    boundMs,
    warmupMs: (w.from ?? Date.now()) - w.warmupFrom,
    warmupPostcopyRequests: postcopyRequestsBetween(c, srcFrom, mig.progress, w.warmupFrom, w.from ?? Date.now()),
    aboveBound: { n: above, pct: w.ping.rtts.length ? r2((above / w.ping.rtts.length) * 100) : null },
    postcopyRequests: w.from !== null && w.to !== null ? postcopyRequestsBetween(c, srcFrom, mig.progress, w.from, w.to) : null,
    postcopyRequestsTotal:
      (mig.progress.filter((p) => typeof p.ram?.postcopyRequests === 'number').at(-1)?.ram.postcopyRequests as number | undefined) ?? null,
    outcome,
    ...(outcome === (last ? 'completed' : 'rolled-back') ? {} : { migrateError: mig.stderr.slice(-1500) }),
    migrateTotalMs: (mig.result?.totalMs as number | undefined) ?? r2(now() - t0),
  };
  log(
    `${label}: -> ${outcome}; gate hold p50 ${model?.p50} p99 ${model?.p99} max ${model?.max} ms ` +
      `(${model?.releasesLogged}/${model?.n} from the release log; formula p50 ≈ ${floorMs.p50} ms), ${g.aboveBound.pct}% above ${boundMs} ms; ` +
      `warm-up ${g.warmupMs} ms (${g.warmupPostcopyRequests} page requests); ` +
      `${g.epochs} checkpoints (pause p50 ${g.pauseMs.p50}, send p50 ${g.sendMs.p50}, ACK p50 ${g.ackMs.p50} ms), ` +
      `${g.postcopyRequests} post-copy page requests in ${g.sampleMs} ms (${g.postcopyRequestsTotal} in the migration)`,
  );
  if (last) {
    const sw = mig.progress.find((p) => p.phase === 'postcopy');
    g.windowMs = sw && mig.result?.totalMs ? r2(Number(mig.result.totalMs) - Number(sw.t)) : null;
  }
  return g;
}

async function gatePhases(c: Cluster, bootMs: number): Promise<GateRun> {
  const out: GateRun = { bootMs, gated: [], control: [] };
  try {
    out.before = await sample(c, c.src, 'gate before migration');
    const slack = out.before.ping.p99 ?? 0;
    const links: (Link | null)[] = opt.gatedLinks.length ? opt.gatedLinks : [null];
    settings: for (const [j, link] of links.entries()) {
      if (link) {
        shapeLink(c, link);
        log(`gate: migration link shaped to ${link}`);
      }
      if (opt.control) {
        // The same windows with the destination's gate forced open: everything but the gate's hold.
        await c.termDaemon(c.dst);
        await c.restartDaemon(c.dst, { faults: 'gate-open' });
        for (const interval of opt.intervals) {
          const g = await windowRun(c, interval, false, slack, true, link);
          out.control.push(g);
          if (g.outcome !== 'rolled-back') throw new Error(`control: abort did not roll back (${g.outcome})`);
          await waitReachable(c, 'the guest answers on the source after the rollback');
        }
        await c.termDaemon(c.dst);
        await c.restartDaemon(c.dst, { faults: undefined });
      }
      for (const [i, interval] of opt.intervals.entries()) {
        const last = i === opt.intervals.length - 1 && j === links.length - 1;
        const g = await windowRun(c, interval, last, slack, false, link);
        const outcome = g.outcome;
        out.gated.push(g);
        if (last || outcome === 'completed') {
          if (outcome !== 'completed') throw new Error(`the last migration did not complete: ${g.migrateError}`);
          // A window that closed before the abort: the VM is on the destination now, so the
          // remaining intervals cannot be measured in this run (their rows stay empty).
          if (!last) log(`gate: the migration completed before the abort; intervals after ${interval} ms not measured`);
          await waitReachable(c, 'the guest answers on the destination');
          out.after = await sample(c, c.dst, 'gate after completion');
          break settings;
        } else {
          if (outcome !== 'rolled-back') throw new Error(`abort did not roll back (${outcome}): ${g.migrateError}`);
          await waitReachable(c, 'the guest answers on the source after the rollback');
        }
      }
    }
  } catch (e) {
    out.error = (e as Error).stack ?? String(e);
    log(`gate failed: ${(e as Error).message}`);
  }
  return out;
}

// ------------------------------------------------------------------ stall after switchover (--only stall)

/** Client query interval of the stall bench (issue 16: a query every 20 ms). */
const STALL_QUERY_MS = 20;
/** tether ≤ this × vanilla post-copy's stall (issue 16). */
const TARGET_STALL_RATIO = 2;
const STALL_VANILLA_PORT = 49_300;
/** Answers after the switchover before a tether run is aborted (1 s at 20 ms). */
const STALL_ANSWERS_AFTER = 50;
/** Answers from this long before the migrate request count (vanilla's STOP follows it within ms). */
const STALL_LOOKBACK_MS = 2000;

interface StallRun {
  side: 'tether' | 'vanilla';
  link: Link;
  /** Around the switchover (tether: the source's QEMU STOP before switchover, from its log; vanilla: the source's QMP STOP event). */
  stall: StallFigure;
  /** The largest gap between the answers counted (2 s before the migrate request to the abort / a second of answers after completion): a cross-check. */
  largestGap: StallFigure;
  switchAt: number | null;
  /** The migration's outcome: tether is aborted (rolled back) after the first second of answers on the destination. */
  outcome: string | null;
  answers: number;
  /** Answer arrival times (ms after the migrate request), kept for a later look. */
  answerTimes: number[];
  error?: string;
}

interface StallResult {
  runs: StallRun[];
  bootMs: { tether: number; vanilla: number };
  error?: string;
}

/** One tether migration: the stall around the switchover, then `tether abort` (hold-completion keeps the window open). */
async function tetherStallRun(c: Cluster, client: NetClient, link: Link): Promise<StallRun> {
  const srcFrom = fileSize(c.src.daemonLog);
  const t0 = Date.now();
  const migrating = c.migrate();
  let ended = false;
  void migrating.finally(() => (ended = true));
  const switchRec = (): Rec | undefined => records(c.src.daemonLog, srcFrom).find((r) => r.to === 'switchover');
  await waitFor(() => ended || switchRec() !== undefined, 'tether switchover (source log)', 180_000);
  const rec = switchRec();
  const switchAt = rec ? (typeof rec.qemuStopAt === 'number' ? rec.qemuStopAt : Date.parse(String(rec.t))) : null;
  if (switchAt !== null)
    await waitFor(
      () => ended || client.answers(switchAt + 1).length >= STALL_ANSWERS_AFTER || Date.now() - switchAt > 60_000,
      'answers after the tether switchover',
    );
  const t1 = Date.now();
  if (!ended) {
    const a = await c.tether(c.src, ['abort', c.vmName]);
    if (a.code !== 0) log(`abort: ${a.stderr}`);
  }
  const mig = await migrating;
  // from before the migrate request (the STOP can follow it within ms) to the abort
  const times = client
    .answers(t0 - STALL_LOOKBACK_MS)
    .map((e) => e.t)
    .filter((x) => x <= t1);
  await waitReachable(c, 'the guest answers on the source after the rollback');
  const sinceBack = Date.now();
  await client.waitAnswers(10, 'after the rollback', sinceBack, 60_000);
  return {
    side: 'tether',
    link,
    stall: stallAround(times, switchAt, STALL_ANSWERS_AFTER),
    largestGap: largestGap(times),
    switchAt,
    outcome: (mig.result?.outcome as string | undefined) ?? null,
    answers: times.length,
    answerTimes: times.map((x) => x - t0),
  };
}

/** One vanilla post-copy migration (migrate, then migrate-start-postcopy at once) to the other host; returns the new QEMU. */
async function vanillaStallRun(
  c: Cluster,
  client: NetClient,
  link: Link,
  from: { q: VQemu; h: Host },
  k: number,
): Promise<{ run: StallRun; to: { q: VQemu; h: Host } }> {
  const toHost = from.h === c.src ? c.dst : c.src;
  const vm = loadVmConfig(c.vmConfig);
  const q = await startVanillaQemu(c, toHost, vm, `v${k}`, LOG_DIR, { kind: 'defer' });
  const caps = { capabilities: [{ capability: 'postcopy-ram', state: true }] };
  await q.qmp.execute('migrate-set-capabilities', caps);
  const uri = `tcp:${toHost.addr}:${STALL_VANILLA_PORT}`;
  await q.qmp.execute('migrate-incoming', { uri });
  await from.q.qmp.execute('migrate-set-capabilities', caps);
  // QEMU unthrottled: the tbf-shaped link is the limit, as for tether (its VM config's maxBandwidth 0)
  await from.q.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 10 * 1024 * MiB, 'max-postcopy-bandwidth': 0 });
  let switchAt: number | null = null;
  const onEv = (name: string, _d: unknown, ts: { seconds: number; microseconds: number } | undefined): void => {
    if (name === 'STOP' && switchAt === null && ts) switchAt = ts.seconds * 1000 + ts.microseconds / 1000;
  };
  from.q.qmp.on('event', onEv);
  const t0 = Date.now();
  let outcome: string | null = null;
  try {
    await from.q.qmp.execute('migrate', { uri });
    await from.q.qmp.execute('migrate-start-postcopy');
    const deadline = Date.now() + 180_000;
    for (;;) {
      const m = (await from.q.qmp.execute('query-migrate')) as Rec;
      if (m.status === 'completed') {
        outcome = 'completed';
        break;
      }
      if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`vanilla migration ${m.status}: ${m['error-desc'] ?? ''}`);
      if (Date.now() > deadline) throw new Error('vanilla post-copy did not complete');
      await sleep(20);
    }
  } finally {
    from.q.qmp.off('event', onEv);
  }
  const sw = switchAt as number | null;
  if (sw !== null)
    await waitFor(
      () => client.answers(sw + 1).length >= STALL_ANSWERS_AFTER || Date.now() - sw > 60_000,
      'answers after the vanilla switchover',
    );
  const t1 = Date.now();
  const times = client
    .answers(t0 - STALL_LOOKBACK_MS)
    .map((e) => e.t)
    .filter((x) => x <= t1);
  await killVanilla(from.q);
  fs.rmSync(`/dev/shm/tether-${c.id}/vanilla/${from.q.label}.ram`, { force: true });
  return {
    run: {
      side: 'vanilla',
      link,
      stall: stallAround(times, sw, STALL_ANSWERS_AFTER),
      largestGap: largestGap(times),
      switchAt: sw,
      outcome,
      answers: times.length,
      answerTimes: times.map((x) => x - t0),
    },
    to: { q, h: toHost },
  };
}

/**
 * The client-visible stall after switchover, tether beside vanilla QEMU post-copy: two
 * clusters booted side by side (tether: the gate cluster with hold-completion, every
 * migration aborted once the client has had a second of answers from the destination;
 * vanilla: QEMU started directly on the cluster's TAPs, migrated back and forth between
 * the hosts), a netclient in each client namespace querying every 20 ms; for each
 * --stall-links setting, --stall-repeats migrations of each, alternating.
 */
async function stallBench(): Promise<StallResult> {
  const vmOpts = {
    memcheckMiB: 4,
    memcheckMBps: 1,
    memoryMiB: opt.guestMiB,
    intervalMs: opt.intervals[0]!,
    maxBandwidth: 0, // the tbf link is the limit
    hotStandby: false,
  };
  const tc = new Cluster({ guestNet: 'gate', holdCompletion: true, vm: vmOpts });
  const vc = new Cluster({ guestNet: 'qemu-tap', vm: vmOpts });
  const out: StallResult = { runs: [], bootMs: { tether: 0, vanilla: 0 } };
  let cur: { q: VQemu; h: Host } | undefined;
  try {
    await tc.up();
    await vc.up(); // its daemons stay idle: only the namespaces, the TAPs and the VM YAML are used
    const tb = now();
    const vanillaBoot = (async () => {
      const q = await startVanillaQemu(vc, vc.src, loadVmConfig(vc.vmConfig), 'v0', LOG_DIR);
      cur = { q, h: vc.src };
      await waitReachable(vc, 'vanilla: the guest answers ping');
      await waitFor(() => /netcheck listening/.test(readText(q.serialLog)), 'vanilla: netcheck listening', 120_000);
      return r2(now() - tb);
    })();
    const [tBoot, vBoot] = await Promise.all([boot(tc, 'stall tether'), vanillaBoot]);
    out.bootMs = { tether: tBoot, vanilla: vBoot };
    const tClient = tc.netclient({ intervalMs: STALL_QUERY_MS });
    const vClient = vc.netclient({ intervalMs: STALL_QUERY_MS });
    await tClient.waitAnswers(20, 'tether before the first migration', 0, 60_000);
    await vClient.waitAnswers(20, 'vanilla before the first migration', 0, 60_000);
    let k = 0;
    for (const link of opt.stallLinks) {
      shapeLink(tc, link);
      shapeLink(vc, link);
      for (let i = 0; i < opt.stallRepeats; i++) {
        const t = await tetherStallRun(tc, tClient, link);
        out.runs.push(t);
        log(`stall ${link} #${i + 1}: tether ${t.stall.ms} ms (largest gap ${t.largestGap.ms} ms, ${t.outcome})`);
        const v = await vanillaStallRun(vc, vClient, link, cur!, ++k);
        cur = v.to;
        out.runs.push(v.run);
        log(`stall ${link} #${i + 1}: vanilla ${v.run.stall.ms} ms (largest gap ${v.run.largestGap.ms} ms)`);
      }
    }
    const bad = [...tClient.violations, ...vClient.violations];
    if (bad.length) out.error = `netclient violations: ${JSON.stringify(bad.slice(0, 3))}`;
    await tClient.stop();
    await vClient.stop();
  } catch (e) {
    out.error = (e as Error).stack ?? String(e);
    log(`stall failed: ${(e as Error).message}`);
  } finally {
    keepLogs(tc, 'stall-tether');
    keepLogs(vc, 'stall-vanilla');
    if (cur) await killVanilla(cur.q);
    await Promise.all([tc.cleanup(), vc.cleanup()]);
  }
  return out;
}

function stallFigures(s: StallResult | undefined): Figure[] {
  if (!s) return [];
  const F: Figure[] = [];
  for (const link of opt.stallLinks) {
    const of = (side: string): StallRun[] => s.runs.filter((r) => r.link === link && r.side === side);
    const t = of('tether');
    const v = of('vanilla');
    const tm = median(t.map((r) => r.stall.ms));
    const vm = median(v.map((r) => r.stall.ms));
    const each = (rs: StallRun[]): string => `runs: ${rs.map((r) => r.stall.ms ?? '–').join(', ')} ms`;
    F.push({ name: `stall after switchover, tether (link ${link})`, value: tm === null ? null : r2(tm), unit: 'ms', note: each(t) });
    F.push({
      name: `stall after switchover, vanilla post-copy (link ${link})`,
      value: vm === null ? null : r2(vm),
      unit: 'ms',
      note: each(v),
    });
    F.push({
      name: `stall after switchover, tether / vanilla (link ${link})`,
      value: tm !== null && vm ? r2(tm / vm) : null,
      unit: '×',
      target: { op: '<=', value: TARGET_STALL_RATIO },
    });
  }
  return F;
}

// ------------------------------------------------------------------ report

interface Results {
  taps: Partial<Record<TapKind, { bootMs: number; sample?: Sample; error?: string }>>;
  gate?: GateRun;
  stall?: StallResult;
}

const dirName = (d: string): string => (d === 'g2c' ? 'guest → client' : 'client → guest');
const sizeName = (s: number): string => (s >= MiB ? `${s / MiB} MiB` : `${s / 1024} KiB`);
const mbit = (s: Sample | undefined, dir: string, size: number): number | null =>
  s?.tcp.find((t) => t.dir === dir && t.size === size)?.mbitPerS ?? null;

function cpuNote(s: Sample | undefined, dir: string, size: number): string {
  const c = s?.tcp.find((t) => t.dir === dir && t.size === size)?.cpu;
  return c ? `CPU: QEMU ${c.qemuPct ?? '–'}%, sidecar ${c.sidecarPct ?? '–'}%` : '';
}

/** ", migration link 200mbit" for a sample taken with --gated-links, "" unshaped. */
const linkName = (s: GatedSample): string => (s.link ? `, migration link ${s.link}` : '');
/** The forced-open sample of the same interval and link setting as `s`. */
const controlOf = (g: GateRun | undefined, s: GatedSample): GatedSample | undefined =>
  g?.control.find((x) => x.intervalMs === s.intervalMs && x.link === s.link);

function figures(res: Results): Figure[] {
  const F: Figure[] = stallFigures(res.stall);
  if (!['tap', 'tap-novnet', 'gate'].some((k) => opt.only.has(k))) return F;
  const tap = res.taps.tap?.sample;
  const novnet = res.taps['tap-novnet']?.sample;
  const g = res.gate;
  const pingFig = (name: string, s: { ping: PingStats } | undefined, note = ''): void => {
    const loss = s ? `${s.ping.received}/${s.ping.sent} replies` : '';
    F.push({ name: `${name}: ping RTT p50`, value: s?.ping.p50 ?? null, unit: 'ms', note: [loss, note].filter(Boolean).join('; ') });
    F.push({ name: `${name}: ping RTT p99`, value: s?.ping.p99 ?? null, unit: 'ms' });
  };
  if (opt.only.has('tap')) pingFig('QEMU tap (vanilla)', tap);
  if (novnet) pingFig('QEMU tap, vnet_hdr=off', novnet);
  pingFig('gate, before migration (pass-through)', g?.before);
  for (const s of g?.gated ?? []) {
    const name = `gate, post-copy window, interval ${s.intervalMs} ms${linkName(s)} (gated)`;
    pingFig(
      name,
      s,
      `n=${s.ping.received} in window over ${(s.sampleMs / 1000).toFixed(1)} s` +
        `${s.discarded ? `, ${s.discarded} discarded (window closed)` : ''}; warm-up (not counted) p50 ${s.warmup?.p50 ?? '–'} ms, ${s.warmup?.received ?? 0}/${s.warmup?.sent ?? 0} replies` +
        `${s.windowOpen ? '' : `; WINDOW CLOSED: fewer than ${opt.gatedPingCount} samples`}`,
    );
    F.push({
      name: `${name}: gate hold p50 (replayed from the logs)`,
      value: s.model?.p50 ?? null,
      unit: 'ms',
      note:
        `p99 ${s.model?.p99 ?? '–'}, max ${s.model?.max ?? '–'} ms; ${s.epochs} checkpoints in the sample: epoch period p50 ${s.periodMs.p50 ?? '–'}, ` +
        `pause p50 ${s.pauseMs.p50 ?? '–'}, send p50 ${s.sendMs.p50 ?? '–'}, ACK p50 ${s.ackMs.p50 ?? '–'} ms ` +
        `(period/2 + pause + send + ACK ≈ ${s.floorMs.p50 ?? '–'} ms)`,
    });
    F.push({
      name: `${name}: replies later than the gate explains`,
      value: s.aboveBound.pct,
      unit: '%',
      note:
        `${s.aboveBound.n} of ${s.ping.received} above ${s.boundMs ?? '–'} ms (longest gate hold + pass-through p99); ` +
        `post-copy page requests: ${s.postcopyRequests ?? '–'} in the sample, ${s.warmupPostcopyRequests ?? '–'} in the ${(s.warmupMs / 1000).toFixed(1)} s warm-up`,
    });
  }
  pingFig('gate, after completion (pass-through)', g?.after);
  if (opt.rttOnly) return F;
  for (const dir of ['g2c', 'c2g'] as const) {
    for (const size of opt.sizes) {
      const what = `TCP ${dirName(dir)}, ${sizeName(size)} transfers`;
      const t = mbit(tap, dir, size);
      const b = mbit(g?.before, dir, size);
      F.push({ name: `${what}: QEMU tap`, value: t, unit: 'Mbit/s', note: cpuNote(tap, dir, size) });
      F.push({ name: `${what}: tether steady state (before migration)`, value: b, unit: 'Mbit/s', note: cpuNote(g?.before, dir, size) });
      F.push({
        name: `${what}: steady state / tap`,
        value: t && b ? r2(b / t) : null,
        unit: '×',
        target: { op: '>=', value: TARGET_RATIO },
      });
      if (novnet) {
        const n = mbit(novnet, dir, size);
        F.push({
          name: `${what}: QEMU tap, vnet_hdr=off`,
          value: n,
          unit: 'Mbit/s',
          note: `no offloads, like the gate; ${cpuNote(novnet, dir, size)}`,
        });
        F.push({
          name: `${what}: steady state / tap vnet_hdr=off`,
          value: n && b ? r2(b / n) : null,
          unit: '×',
          note: 'what the offloads are worth',
        });
      }
      const a = mbit(g?.after, dir, size);
      F.push({ name: `${what}: tether after completion (relay detached)`, value: a, unit: 'Mbit/s' });
      F.push({
        name: `${what}: after completion / tap`,
        value: t && a ? r2(a / t) : null,
        unit: '×',
        target: { op: '>=', value: TARGET_RATIO },
      });
      for (const s of g?.gated ?? []) {
        const tr = s.tcp.find((x) => x.dir === dir && x.size === size);
        if (!tr) continue; // not measured at this size in the window
        F.push({
          name: `${what}: gated, interval ${s.intervalMs} ms${linkName(s)}`,
          value: tr?.mbitPerS ?? null,
          unit: 'Mbit/s',
          note: [
            tr?.transferMs ? `transfer p50 ${tr.transferMs.p50} ms` : tr?.error,
            s.tcpWindowOpen ? '' : 'WINDOW CLOSED during the sample',
          ]
            .filter(Boolean)
            .join('; '),
        });
        const ctl = controlOf(g, s)?.tcp.find((x) => x.dir === dir && x.size === size);
        if (ctl) {
          F.push({
            name: `${what}: in window, gate forced open (relay only), interval ${s.intervalMs} ms${linkName(s)}`,
            value: ctl.mbitPerS ?? null,
            unit: 'Mbit/s',
          });
          F.push({
            name: `${what}: relay only / tap${linkName(s)}`,
            value: t && ctl.mbitPerS ? r2(ctl.mbitPerS / t) : null,
            unit: '×',
          });
        }
        F.push({
          name: `${what}: gated, interval ${s.intervalMs} ms${linkName(s)} / tap`,
          value: t && tr?.mbitPerS ? r2(tr.mbitPerS / t) : null,
          unit: '×',
          target: { op: '>=', value: TARGET_GATED_RATIO },
        });
      }
    }
  }
  return F;
}

/**
 * The closing note's RTT table: each phase's ping RTT beside what the gate alone explains
 * (its floor and bound, from the checkpoint timings of the same seconds).
 */
function rttTable(res: Results): string[] {
  const g = res.gate;
  if (!g) return [];
  const ms = (v: number | null | undefined): string => (v === null || v === undefined ? '–' : `${v}`);
  const rows = [
    '| ping RTT client → guest | replies / requests | p50 ms | p99 ms | same window, gate forced open: p50 / p99 ms | gate hold replayed: p50 / p99 ms | later than the gate explains | warm-up (not counted) | post-copy page requests: warm-up / sample |',
    '|---|---:|---:|---:|---:|---:|---:|---|---:|',
  ];
  const plain = (name: string, s: Sample | undefined): void => {
    if (s) rows.push(`| ${name} | ${s.ping.received} / ${s.ping.sent} | ${ms(s.ping.p50)} | ${ms(s.ping.p99)} | | | | | |`);
  };
  const ctl = (s: GatedSample): string => {
    const k = controlOf(g, s);
    if (!k) return '–';
    const n = `${k.ping.received} / ${k.ping.sent}${k.windowOpen ? '' : ' WINDOW CLOSED'}`;
    return `${ms(k.ping.p50)} / ${ms(k.ping.p99)} (n ${n})`;
  };
  plain('before migration (pass-through)', g.before);
  for (const s of g.gated) {
    const wu = s.warmup;
    rows.push(
      `| post-copy window, interval ${s.intervalMs} ms${linkName(s)} | ${s.ping.received} / ${s.ping.sent} in window` +
        `${s.discarded ? ` (${s.discarded} discarded)` : ''}${s.windowOpen ? '' : ' WINDOW CLOSED'} | ` +
        `${ms(s.ping.p50)} | ${ms(s.ping.p99)} | ${ctl(s)} | ${ms(s.model?.p50)} / ${ms(s.model?.p99)} | ` +
        `${s.aboveBound.pct === null ? '–' : `${s.aboveBound.pct} % (> ${s.boundMs} ms)`} | ` +
        `${(s.warmupMs / 1000).toFixed(1)} s, ${wu?.received ?? 0} / ${wu?.sent ?? 0} replies, max ${ms(wu?.max)} ms | ` +
        `${s.warmupPostcopyRequests ?? '–'} / ${s.postcopyRequests ?? '–'} in ${(s.sampleMs / 1000).toFixed(1)} s |`,
    );
  }
  plain('after completion (pass-through)', g.after);
  return [
    ...rows,
    '',
    `In-window samples: chunks of ${opt.pingChunk} pings every ${opt.pingIntervalMs} ms, from checkpoint ${opt.warmupEpochs} ` +
      `acknowledged on. Warm-up (not counted): at least ${opt.warmupChunks} chunk(s), then until a chunk is answered in full ` +
      `(at most ${opt.warmupMaxChunks}): in the first seconds after the switchover the guest stalls while it faults its working set in. ` +
      'A chunk counts only if the source still reports post-copy after its last reply (so every counted reply left through ' +
      'the gated gate); a chunk during which the window closed is discarded. Requests − replies: replies not back when ' +
      'busybox ping stopped waiting (twice the slowest RTT it had seen, after the last request of a chunk), i.e. a stall; ' +
      "the gate drops nothing; p99 leaves them out. Gate hold: the gate's share, replayed from the logs of the same seconds " +
      '(a request every ping interval, answered at once or when the guest resumes from its checkpoint pause, released with ' +
      "its epoch per the gate's release log). Gate forced open: the same migration and window with the destination's " +
      'gate in pass-through (TETHER_FAULTS=gate-open), measured first: checkpoint pauses, post-copy faults and the guest ' +
      "without the gate's hold. Later than the gate explains: RTT above the longest replayed hold plus the " +
      "pass-through p99: held by something else, mostly post-copy faults blocking the guest's QEMU (page requests QEMU " +
      'counted in the same seconds in the last column).',
    '',
  ];
}

function summaryMarkdown(res: Results, command: string): string {
  const load = os
    .loadavg()
    .map((l) => l.toFixed(2))
    .join(' ');
  const last = res.gate?.gated.at(-1);
  return [
    `# net benchmark, ${STARTED}`,
    '',
    ...(opt.only.size === 1 && res.stall
      ? [
          `\`${command}\` — QEMU TCG, netcheck + memcheck 4 MiB at 1 MB/s; ${os.cpus().length} CPUs, load average ${load} at the end ` +
            '(other work may share this machine: figures are indicative).',
          '',
        ]
      : [
          `\`${command}\` — guest ${opt.guestMiB} MiB, QEMU TCG, netcheck + memcheck 4 MiB at 1 MB/s; ping ×${opt.pingCount} every ` +
            `${opt.pingIntervalMs} ms; TCP ${opt.tcpSeconds} s per direction and transfer size; migration link ${opt.bandwidthMiB} MiB/s` +
            `${last?.windowMs ? ` (post-copy window of the completing run ${(last.windowMs / 1000).toFixed(1)} s)` : ''}; ` +
            `${os.cpus().length} CPUs, load average ${load} at the end (other work may share this machine: figures are indicative).`,
          '',
        ]),
    ...rttTable(res),
    ...(res.stall
      ? [
          `Stall after switchover: a netclient queries the guest's netcheck every ${STALL_QUERY_MS} ms over one TCP connection; ` +
            "the stall is the longest silence between answers from the last answer at or before the source QEMU's STOP of the " +
            "switchover (tether: from the source's log; vanilla: its QMP event) over the next 50 answers (last answer before → " +
            'first answer after, unless a reply already in flight at the STOP arrives first); median of ' +
            `${opt.stallRepeats} migrations per side and link (tbf on the migration link, QEMU unthrottled, guest ${opt.guestMiB} MiB). ` +
            'tether runs with hold-completion and is aborted once the client has had a second of answers from the destination; ' +
            'vanilla post-copy (migrate, then migrate-start-postcopy at once) moves the VM back and forth between the hosts.',
          '',
        ]
      : []),
    markdownTable(figures(res)),
    '',
    'PASS/MISS compare this run with the targets of issue 16 (steady state ≥ 0.95× and gated ≥ 0.8× QEMU tap; stall after ' +
      "switchover ≤ 2× vanilla post-copy's); findings, not test failures.",
  ].join('\n');
}

async function writePlots(dir: string, res: Results): Promise<string[]> {
  const { files, put } = plotDir(dir, log);
  const g = res.gate;
  type Sampled = { ping: PingStats; tcp: TcpResult[] };
  const samples: [string, Sampled | undefined][] = [
    ['QEMU tap', res.taps.tap?.sample],
    ['tap vnet_hdr=off', res.taps['tap-novnet']?.sample],
    ['gate before', g?.before],
    ...(g?.gated ?? []).map((s): [string, Sampled] => [`gated ${s.intervalMs} ms`, s]),
    ['gate after', g?.after],
  ];
  const rtt = samples.flatMap(([series, s]) =>
    s && s.ping.p50 !== null
      ? [
          { group: 'p50', series, value: s.ping.p50 },
          { group: 'p99', series, value: s.ping.p99 ?? 0 },
        ]
      : [],
  );
  if (rtt.length) await put('rtt.svg', barsSpec({ title: 'Ping RTT client → guest', yTitle: 'ms', rows: rtt }));
  const thr = samples.flatMap(([series, s]) =>
    (s?.tcp ?? []).flatMap((t) =>
      t.mbitPerS !== null
        ? [{ group: `${t.dir === 'g2c' ? 'guest→client' : 'client→guest'} ${sizeName(t.size)}`, series, value: t.mbitPerS }]
        : [],
    ),
  );
  if (thr.length) await put('tcp.svg', barsSpec({ title: 'TCP throughput through the NIC', yTitle: 'Mbit/s', rows: thr }));
  return files;
}

// ------------------------------------------------------------------ main

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('needs root (network namespaces)');
  log(`options ${JSON.stringify({ ...opt, only: [...opt.only] })}`);
  const t0 = now();
  fs.mkdirSync(LOG_DIR, { recursive: true });
  const res: Results = { taps: {} };
  const taps = (Object.keys(TAPS) as TapKind[])
    .filter((k) => opt.only.has(k))
    .map((k) => ({ k, c: clusterFor('qemu-tap', opt.intervals[0]!, TAPS[k].vnetHdr) }));
  const gateC = opt.only.has('gate') ? clusterFor('gate', opt.intervals[0]!) : undefined;
  try {
    // Booted side by side (the boots are not measured); all stay up until the end, so
    // every sample runs beside the same idle guests.
    // The clusters' daemons start one cluster after another: six sidecars starting at once
    // on two cores can miss the cluster's wait for their control sockets.
    for (const c of [...taps.map((x) => x.c), ...(gateC ? [gateC] : [])]) await c.up();
    const boots = await Promise.all([...taps.map(({ k, c }) => boot(c, k)), gateC ? boot(gateC, 'gate') : 0]);
    await sleep(1000); // let the boots' tail (udev, memcheck's first pass) settle
    for (const [i, { k, c }] of taps.entries()) {
      const r: { bootMs: number; sample?: Sample; error?: string } = { bootMs: boots[i]! };
      res.taps[k] = r;
      try {
        r.sample = await sample(c, c.src, TAPS[k].label);
      } catch (e) {
        r.error = (e as Error).stack ?? String(e);
      }
    }
    if (gateC) res.gate = await gatePhases(gateC, boots.at(-1)!);
    if (opt.only.has('stall')) res.stall = await stallBench();
  } finally {
    for (const { k, c } of taps) keepLogs(c, k);
    if (gateC) keepLogs(gateC, 'gate');
    await Promise.all([...taps.map(({ c }) => c.cleanup()), gateC?.cleanup()]);
  }
  const command = `npm run bench net -- ${process.argv.slice(2).join(' ')}`.trim();
  const md = summaryMarkdown(res, command);
  const plots = await writePlots(RUN_DIR, res);
  const json =
    JSON.stringify(
      {
        bench: 'net',
        date: STARTED,
        durationMs: r2(now() - t0),
        host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, kernel: os.release(), node: process.version, loadavg: os.loadavg() },
        options: { ...opt, only: [...opt.only] },
        targetRatio: TARGET_RATIO,
        targetGatedRatio: TARGET_GATED_RATIO,
        figures: figures(res),
        taps: res.taps,
        gate: res.gate ?? null,
        stall: res.stall ?? null,
        plots,
      },
      null,
      2,
    ) + '\n';
  fs.writeFileSync(path.join(RUN_DIR, 'net.json'), json);
  fs.writeFileSync(path.join(RUN_DIR, 'summary.md'), md + plots.map((p) => `\n![${p}](${p})\n`).join(''));
  fs.writeFileSync(path.join(OUT_DIR, 'net.json'), json);
  fs.writeFileSync(path.join(OUT_DIR, 'net.md'), md);
  console.log(
    `\n${md}\n\nwrote ${RUN_DIR}/ (net.json, summary.md, ${plots.length} SVG plots; logs in ${LOG_DIR}) in ${Math.round((now() - t0) / 1000)} s`,
  );
  if (Object.values(res.taps).some((t) => t.error) || res.gate?.error || res.stall?.error) process.exitCode = 1;
}

await main();
