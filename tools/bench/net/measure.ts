/**
 * What the network benchmark measures on a running guest (ping RTT, TCP throughput through lab/net/bulk-client.ts, CPU) and the clusters it measures in.
 */
import fs from 'node:fs';
import path from 'node:path';
import { Cluster } from '../../../lab/cluster.ts';
import { sh, waitFor } from '../../../lab/proc.ts';
import { GUEST_IP, NETCHECK_PORT, type Host } from '../../../lab/topology.ts';
import { percentile } from '../../../src/util/time.ts';
import { copyClusterLogs } from '../lib.ts';
import { CLIENT, LOG_DIR, MiB, PING_WAIT_S, log, now, opt, r2, run } from './plan.ts';

export interface PingStats {
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

export function pingStats(count: number, rtts: number[], missing: number[]): PingStats {
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
export async function ping(c: Cluster, count: number, intervalMs: number): Promise<PingStats> {
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

export interface TcpResult {
  dir: 'g2c' | 'c2g';
  size: number;
  mbitPerS: number | null;
  transfers?: number;
  bytes?: number;
  seconds?: number;
  transferMs?: { p50: number; p99: number };
  /**
   * CPU of the VM's QEMU and of the sidecar of its host during the transfers, % of one core;
   * in the window also the source's sidecar (`peerPct`: it receives and applies the checkpoints).
   */
  cpu?: Cpu;
  error?: string;
}

export async function tcp(c: Cluster, dir: 'g2c' | 'c2g', size: number, seconds: number): Promise<TcpResult> {
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

export interface Sample {
  label: string;
  ping: PingStats;
  tcp: TcpResult[];
  ms: number;
}

/** utime + stime of a process in seconds (/proc/<pid>/stat; 100 ticks/s), null when gone. */
export function cpuSeconds(pid: number | undefined): number | null {
  if (!pid) return null;
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch {
    return null;
  }
}

export interface Cpu {
  qemuPct: number | null;
  sidecarPct: number | null;
  peerPct?: number | null;
}

/**
 * CPU used by the VM's QEMU and the host's sidecar during `fn` (and `peer`'s sidecar, when
 * given), as % of one core.
 */
export async function withCpu<T>(c: Cluster, h: Host, fn: () => Promise<T>, peer?: Host): Promise<T & { cpu: Cpu }> {
  const pids = [Number((await c.status(h)).pid) || undefined, h.daemon?.pid, peer?.daemon?.pid];
  const before = pids.map(cpuSeconds);
  const t0 = now();
  const r = await fn();
  const dt = (now() - t0) / 1000;
  const pct = pids.map((p, i) => {
    const a = before[i]!;
    const b = cpuSeconds(p);
    return a === null || b === null ? null : Math.round(((b - a) / dt) * 100);
  });
  return { ...r, cpu: { qemuPct: pct[0]!, sidecarPct: pct[1]!, ...(peer ? { peerPct: pct[2]! } : {}) } };
}

/**
 * One sample from several rounds of the same measurement: per TCP direction and size the
 * round with the median rate (its CPU figures with it), the ping of the median-p50 round.
 */
export function medianSample(rounds: Sample[]): Sample {
  const mid = <T>(xs: T[], key: (x: T) => number): T => [...xs].sort((a, b) => key(a) - key(b))[Math.floor((xs.length - 1) / 2)]!;
  const first = rounds[0]!;
  if (rounds.length === 1) return first;
  const tcp = first.tcp.map((t) =>
    mid(
      rounds.map((r) => r.tcp.find((x) => x.dir === t.dir && x.size === t.size) ?? t),
      (x) => x.mbitPerS ?? -1,
    ),
  );
  return {
    label: `${first.label} (median of ${rounds.length} rounds)`,
    ping: mid(
      rounds.map((r) => r.ping),
      (p) => p.p50 ?? Infinity,
    ),
    tcp,
    ms: rounds.reduce((n, r) => n + r.ms, 0),
  };
}

export interface SampleSpec {
  pingCount: number;
  sizes: number[];
  tcpSeconds: number;
}
export const FULL = (): SampleSpec => ({ pingCount: opt.pingCount, sizes: opt.rttOnly ? [] : opt.sizes, tcpSeconds: opt.tcpSeconds });

export async function tcpSamples(c: Cluster, h: Host, label: string, sizes: number[], seconds: number, peer?: Host): Promise<TcpResult[]> {
  const t: TcpResult[] = [];
  for (const dir of ['g2c', 'c2g'] as const) {
    for (const size of sizes) {
      const res = await withCpu(c, h, () => tcp(c, dir, size, seconds), peer);
      const p = peer ? `, source's sidecar ${res.cpu.peerPct}%` : '';
      log(
        `${label}: tcp ${dir} ${size} B: ${res.mbitPerS ?? res.error} Mbit/s (CPU: QEMU ${res.cpu.qemuPct}%, sidecar ${res.cpu.sidecarPct}%${p})`,
      );
      t.push(res);
    }
  }
  return t;
}

export async function sample(c: Cluster, h: Host, label: string, spec: SampleSpec = FULL()): Promise<Sample> {
  const t0 = now();
  const p = await ping(c, spec.pingCount, opt.pingIntervalMs);
  log(`${label}: ping p50 ${p.p50} ms p99 ${p.p99} ms (${p.received}/${p.sent})`);
  const t = await tcpSamples(c, h, label, spec.sizes, spec.tcpSeconds);
  return { label, ping: p, tcp: t, ms: r2(now() - t0) };
}

// ------------------------------------------------------------------ clusters

export const TAPS = {
  tap: { label: 'QEMU tap', vnetHdr: true },
  'tap-novnet': { label: 'QEMU tap, vnet_hdr=off', vnetHdr: false },
  // the plain tap again in a cluster of its own: the steady-state ratio's A/A reference
  'tap-aa': { label: 'QEMU tap, second cluster (A/A)', vnetHdr: true },
} as const;
export type TapKind = keyof typeof TAPS;

export function clusterFor(guestNet: 'qemu-tap' | 'gate', intervalMs: number, tapVnetHdr = true): Cluster {
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
      ...(opt.guestAppend ? { appendExtra: opt.guestAppend } : {}),
      maxBandwidth: Math.round(opt.bandwidthMiB * MiB),
      // no hot standby: this bench measures no restore, and a standby QEMU's start would share
      // the two cores with the window it measures
      hotStandby: false,
    },
  });
}

export async function boot(c: Cluster, what: string): Promise<number> {
  const t0 = now();
  for (const [k, v] of opt.clientSysctl) sh('ip', ['netns', 'exec', c.clientNs, 'sysctl', '-q', '-w', `${k}=${v}`]);
  const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
  if (r.code !== 0) throw new Error(`${what}: tether vm start failed: ${r.stderr}`);
  await waitReachable(c, `${what}: the guest answers ping`);
  await waitFor(() => /netcheck listening/.test(readText(c.serialLog(c.src))), `${what}: netcheck listening`, 120_000);
  log(`${what}: booted in ${Math.round(now() - t0)} ms`);
  return r2(now() - t0);
}

export async function waitReachable(c: Cluster, what: string): Promise<void> {
  await waitFor(async () => (await ping(c, 1, 100)).received === 1, what, 180_000);
}

export function readText(p: string): string {
  try {
    return fs.readFileSync(p, 'latin1');
  } catch {
    return '';
  }
}

export type Rec = Record<string, any>;
export function records(file: string, from = 0): Rec[] {
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

export async function migStatus(c: Cluster, h: Host): Promise<Rec> {
  return ((await c.status(h)).migration ?? {}) as Rec;
}

/** Rewrite checkpoint.intervalMs in a host's VM config (a destination runs its own config). */
export function setCheckpointInterval(c: Cluster, h: Host, intervalMs: number): void {
  const file = path.join(h.vmConfigDir, `${c.vmName}.yaml`);
  fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace(/intervalMs: \d+/, `intervalMs: ${intervalMs}`));
}

export function keepLogs(c: Cluster, label: string): void {
  const dir = path.join(LOG_DIR, label);
  fs.mkdirSync(dir, { recursive: true });
  copyClusterLogs(c, dir);
}

/** p50/p99 of a list (null when empty), 2 decimals. */
export function dist(v: number[]): { p50: number | null; p99: number | null; n: number } {
  return { p50: v.length ? r2(percentile(v, 50)) : null, p99: v.length ? r2(percentile(v, 99)) : null, n: v.length };
}
