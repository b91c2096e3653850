/**
 * Network benchmark: `npm run bench net [-- options]` (root; network namespaces, real
 * QEMU TCG). Run it under the machine-wide lock:
 *   flock /tmp/tether-qemu.lock npm run bench net [-- --quick]
 *
 * Two clusters of the netns harness (netns-tests/harness.ts), booted side by side and
 * both alive for the whole run, so each measurement sees the same background load:
 *   tap:  the guest's NIC is QEMU's own `-netdev tap` on the host bridge (vanilla baseline);
 *         QEMU's default vnet_hdr gives the guest checksum and segmentation offloads;
 *   tap-novnet: the same with vnet_hdr=off: no offloads, as behind the gate (QEMU 7.2's
 *         stream netdev carries no virtio-net header), so gate vs tap-novnet isolates
 *         the cost of the sidecar's data path from the offloads;
 *   gate: the guest's NIC is the VM config's `nics`, served by the sidecar's packet gate.
 * The guest runs netcheck (tools/guest/netcheck.c) and a slow memcheck; the client
 * namespace pings it (busybox ping: the guest kernel answers ICMP) and moves bulk TCP
 * through netcheck (tools/bench/net-client.ts: B = guest → client, S = client → guest),
 * transfers of each --sizes one after another for --tcp-seconds.
 *
 * Phases of the gate cluster, all in one run:
 *   before   VM on the source, gate in pass-through (compared with the tap cluster)
 *   gated    for each --intervals value: migrate with that checkpoint interval (written
 *            into the destination's VM config, which is what the destination runs), wait
 *            until checkpoint 2 is applied, sample while the post-copy window is open
 *            (a slow QEMU max-bandwidth, --bandwidth-mib, keeps it open), then
 *            `tether abort` (rollback to the source) — except the last interval, whose
 *            migration completes
 *   after    VM on the destination after completion, gate in pass-through
 * A sample is flagged when the window closed while it ran (phase no longer postcopy).
 *
 * Prints figures beside targets (PASS/MISS are findings, not test failures) and writes
 * bench-results/net-<time>/ (net.json, summary.md, SVG plots, logs/) and the latest run
 * at bench-results/net.json and net.md.
 *
 * Options (defaults; --quick in brackets, for the CI smoke bench):
 *   --ping-count 100 [25]      pings per sample, every --ping-interval-ms 20
 *   --tcp-seconds 3 [1]        per direction and size
 *   --gated-ping-count 50 [25], --gated-tcp-seconds 2 [1], --gated-sizes 65536
 *                              the same inside the post-copy window (it must fit in it)
 *   --sizes 65536,4194304 [4194304]   bytes per transfer (64 KiB: request-sized, 4 MiB: bulk)
 *   --intervals 25,50,100 [50] checkpoint intervals of the gated samples
 *   --bandwidth-mib 8 [16]     QEMU max-bandwidth of the migrations (post-copy window length)
 *   --guest-mib 256            guest RAM
 *   --only tap,tap-novnet,gate [tap,gate]   run a subset
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster, fileSize, GUEST_IP, NETCHECK_PORT, ROOT, waitFor, type Host } from '../../netns-tests/harness.ts';
import { waitApplied } from '../../netns-tests/scenarios.ts';
import { percentile } from '../../src/util/time.ts';
import { arg, str } from './args.ts';
import { barsSpec, markdownTable, writeSvg, type Figure } from './report.ts';

// ------------------------------------------------------------------ options

const quick = process.argv.includes('--quick');
const num = arg;
const list = (name: string, def: string): string[] => str(name, def).split(',').filter(Boolean);
const opt = {
  quick,
  pingCount: num('ping-count', quick ? 25 : 100),
  pingIntervalMs: num('ping-interval-ms', 20),
  tcpSeconds: num('tcp-seconds', quick ? 1 : 3),
  gatedPingCount: num('gated-ping-count', quick ? 25 : 50),
  gatedTcpSeconds: num('gated-tcp-seconds', quick ? 1 : 2),
  gatedSizes: list('gated-sizes', '65536').map(Number),
  sizes: list('sizes', quick ? '4194304' : '65536,4194304').map(Number),
  intervals: list('intervals', quick ? '50' : '25,50,100').map(Number),
  bandwidthMiB: num('bandwidth-mib', quick ? 16 : 8),
  guestMiB: num('guest-mib', 256),
  only: new Set(list('only', quick ? 'tap,gate' : 'tap,tap-novnet,gate')),
};
for (const v of [...opt.sizes, ...opt.intervals])
  if (!Number.isInteger(v) || v <= 0) throw new Error('--sizes/--intervals: positive integers');

const MiB = 1024 * 1024;
/** Gate pass-through throughput relative to QEMU's tap (issue 6). */
const TARGET_RATIO = 0.8;
const OUT_DIR = path.join(ROOT, 'bench-results');
const STARTED = new Date().toISOString();
const RUN_DIR = path.join(OUT_DIR, `net-${STARTED.replaceAll(':', '').replace(/\.\d+Z$/, 'Z')}`);
const LOG_DIR = path.join(RUN_DIR, 'logs');
const CLIENT = path.join(ROOT, 'tools', 'bench', 'net-client.ts');
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
  return {
    sent: count,
    received: rtts.length,
    missing: Array.from({ length: count }, (_, i) => i).filter((i) => !got.has(i)),
    p50: rtts.length ? r2(percentile(rtts, 50)) : null,
    p99: rtts.length ? r2(percentile(rtts, 99)) : null,
    max: rtts.length ? r2(Math.max(...rtts)) : null,
  };
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
const FULL = (): SampleSpec => ({ pingCount: opt.pingCount, sizes: opt.sizes, tcpSeconds: opt.tcpSeconds });
/** In the post-copy window: shorter, so that it fits in the window; request-sized transfers only (bulk crawls). */
const GATED = (): SampleSpec => ({ pingCount: opt.gatedPingCount, sizes: opt.gatedSizes, tcpSeconds: opt.gatedTcpSeconds });

async function sample(c: Cluster, h: Host, label: string, spec: SampleSpec = FULL()): Promise<Sample> {
  const t0 = now();
  const p = await ping(c, spec.pingCount, opt.pingIntervalMs);
  log(`${label}: ping p50 ${p.p50} ms p99 ${p.p99} ms (${p.received}/${p.sent})`);
  const t: TcpResult[] = [];
  for (const dir of ['g2c', 'c2g'] as const) {
    for (const size of spec.sizes) {
      const res = await withCpu(c, h, () => tcp(c, dir, size, spec.tcpSeconds));
      log(
        `${label}: tcp ${dir} ${size} B: ${res.mbitPerS ?? res.error} Mbit/s (CPU: QEMU ${res.cpu.qemuPct}%, sidecar ${res.cpu.sidecarPct}%)`,
      );
      t.push(res);
    }
  }
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
    vm: {
      // a light memcheck: the guest's CPU goes to the network, memory still changes
      memcheckMiB: 4,
      memcheckMBps: 1,
      memoryMiB: opt.guestMiB,
      intervalMs,
      maxBandwidth: Math.round(opt.bandwidthMiB * MiB),
      // rollbacks restore cold: a NIC's VM has no hot standby (it would take the NIC's socket)
      hotStandby: false,
    },
  });
}

async function boot(c: Cluster, what: string): Promise<number> {
  const t0 = now();
  await c.up();
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
  for (const [from, name] of [
    [c.src.daemonLog, 'daemon-s.log'],
    [c.dst.daemonLog, 'daemon-d.log'],
    [c.serialLog(c.src), 'serial-s.log'],
    [c.serialLog(c.dst), 'serial-d.log'],
  ] as const) {
    try {
      fs.copyFileSync(from, path.join(dir, name));
    } catch {
      /* not created in this run */
    }
  }
}

interface GatedSample extends Sample {
  intervalMs: number;
  /** The post-copy window stayed open for the whole sample. */
  windowOpen: boolean;
  appliedEpochs: { before: number | null; after: number | null };
  /** Destination checkpoint pauses while sampling (daemon log), ms. */
  pauseMs: { p50: number | null; p99: number | null; n: number };
  /** Time from one checkpoint to the next on the destination, p50 (the interval plus what stretches it), ms. */
  epochPeriodMs: number | null;
  outcome: string | null;
  migrateTotalMs: number | null;
  /** Post-copy window: switchover → completion (completing run only), ms. */
  windowMs?: number | null;
}

interface GateRun {
  bootMs: number;
  before?: Sample;
  gated: GatedSample[];
  after?: Sample;
  error?: string;
}

async function gatePhases(c: Cluster, bootMs: number): Promise<GateRun> {
  const out: GateRun = { bootMs, gated: [] };
  try {
    out.before = await sample(c, c.src, 'gate before migration');
    for (const [i, interval] of opt.intervals.entries()) {
      const last = i === opt.intervals.length - 1;
      setCheckpointInterval(c, c.dst, interval);
      const dstFrom = fileSize(c.dst.daemonLog);
      log(`gate: migrating with interval ${interval} ms${last ? ' (completes)' : ' (aborted after sampling)'}`);
      const t0 = now();
      const migrating = c.migrate();
      await waitApplied(c, 2, migrating);
      const before = await migStatus(c, c.src);
      const s = await sample(c, c.dst, `gate gated ${interval} ms`, GATED());
      const after = await migStatus(c, c.src);
      const windowOpen = before.phase === 'postcopy' && after.phase === 'postcopy';
      const sent = records(c.dst.daemonLog, dstFrom).filter((r) => r.msg === 'checkpoint sent' && typeof r.pauseMs === 'number');
      const pauses = sent.map((r) => Number(r.pauseMs));
      const at = sent.map((r) => Date.parse(String(r.t)));
      const periods = at.slice(1).map((t, i) => t - at[i]!);
      if (!last) {
        const a = await c.tether(c.src, ['abort', c.vmName]);
        if (a.code !== 0) log(`abort: ${a.stderr}`);
      }
      const mig = await migrating;
      const outcome = (mig.result?.outcome as string | undefined) ?? null;
      log(`gate: interval ${interval} ms -> ${outcome} (window open during the sample: ${windowOpen})`);
      const g: GatedSample = {
        ...s,
        intervalMs: interval,
        windowOpen,
        appliedEpochs: { before: before.appliedEpoch ?? null, after: after.appliedEpoch ?? null },
        pauseMs: {
          p50: pauses.length ? r2(percentile(pauses, 50)) : null,
          p99: pauses.length ? r2(percentile(pauses, 99)) : null,
          n: pauses.length,
        },
        epochPeriodMs: periods.length ? r2(percentile(periods, 50)) : null,
        outcome,
        migrateTotalMs: (mig.result?.totalMs as number | undefined) ?? r2(now() - t0),
      };
      if (last) {
        const sw = mig.progress.find((p) => p.phase === 'postcopy');
        g.windowMs = sw && mig.result?.totalMs ? r2(Number(mig.result.totalMs) - Number(sw.t)) : null;
      }
      out.gated.push(g);
      if (last) {
        if (outcome !== 'completed') throw new Error(`the last migration did not complete: ${mig.stderr.slice(-1500)}`);
        await waitReachable(c, 'the guest answers on the destination');
        out.after = await sample(c, c.dst, 'gate after completion');
      } else {
        if (outcome !== 'rolled-back') throw new Error(`abort did not roll back (${outcome}): ${mig.stderr.slice(-1500)}`);
        await waitReachable(c, 'the guest answers on the source after the rollback');
      }
    }
  } catch (e) {
    out.error = (e as Error).stack ?? String(e);
    log(`gate failed: ${(e as Error).message}`);
  }
  return out;
}

// ------------------------------------------------------------------ report

interface Results {
  taps: Partial<Record<TapKind, { bootMs: number; sample?: Sample; error?: string }>>;
  gate?: GateRun;
}

const dirName = (d: string): string => (d === 'g2c' ? 'guest → client' : 'client → guest');
const sizeName = (s: number): string => (s >= MiB ? `${s / MiB} MiB` : `${s / 1024} KiB`);
const mbit = (s: Sample | undefined, dir: string, size: number): number | null =>
  s?.tcp.find((t) => t.dir === dir && t.size === size)?.mbitPerS ?? null;

function cpuNote(s: Sample | undefined, dir: string, size: number): string {
  const c = s?.tcp.find((t) => t.dir === dir && t.size === size)?.cpu;
  return c ? `CPU: QEMU ${c.qemuPct ?? '–'}%, sidecar ${c.sidecarPct ?? '–'}%` : '';
}

function figures(res: Results): Figure[] {
  const F: Figure[] = [];
  const tap = res.taps.tap?.sample;
  const novnet = res.taps['tap-novnet']?.sample;
  const g = res.gate;
  const pingFig = (name: string, s: Sample | undefined, note = ''): void => {
    const loss = s ? `${s.ping.received}/${s.ping.sent} replies` : '';
    F.push({ name: `${name}: ping RTT p50`, value: s?.ping.p50 ?? null, unit: 'ms', note: [loss, note].filter(Boolean).join('; ') });
    F.push({ name: `${name}: ping RTT p99`, value: s?.ping.p99 ?? null, unit: 'ms' });
  };
  pingFig('QEMU tap (vanilla)', tap);
  if (novnet) pingFig('QEMU tap, vnet_hdr=off', novnet);
  pingFig('gate, before migration (pass-through)', g?.before);
  for (const s of g?.gated ?? []) {
    pingFig(
      `gate, post-copy window, interval ${s.intervalMs} ms (gated)`,
      s,
      `epoch period p50 ${s.epochPeriodMs ?? '–'} ms, checkpoint pause p50 ${s.pauseMs.p50 ?? '–'} ms${s.windowOpen ? '' : '; WINDOW CLOSED during the sample'}`,
    );
  }
  pingFig('gate, after completion (pass-through)', g?.after);
  for (const dir of ['g2c', 'c2g'] as const) {
    for (const size of opt.sizes) {
      const what = `TCP ${dirName(dir)}, ${sizeName(size)} transfers`;
      const t = mbit(tap, dir, size);
      const b = mbit(g?.before, dir, size);
      F.push({ name: `${what}: QEMU tap`, value: t, unit: 'Mbit/s', note: cpuNote(tap, dir, size) });
      F.push({ name: `${what}: gate pass-through (before migration)`, value: b, unit: 'Mbit/s', note: cpuNote(g?.before, dir, size) });
      F.push({
        name: `${what}: gate / tap`,
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
          name: `${what}: gate / tap vnet_hdr=off`,
          value: n && b ? r2(b / n) : null,
          unit: '×',
          target: { op: '>=', value: TARGET_RATIO },
          note: "like for like: the sidecar's data path alone",
        });
      }
      const a = mbit(g?.after, dir, size);
      F.push({ name: `${what}: gate after completion`, value: a, unit: 'Mbit/s', note: t && a ? `${r2(a / t)}× tap` : '' });
      for (const s of g?.gated ?? []) {
        const tr = s.tcp.find((x) => x.dir === dir && x.size === size);
        if (!tr) continue; // not measured at this size in the window
        F.push({
          name: `${what}: gated, interval ${s.intervalMs} ms`,
          value: tr?.mbitPerS ?? null,
          unit: 'Mbit/s',
          note: [tr?.transferMs ? `transfer p50 ${tr.transferMs.p50} ms` : tr?.error, s.windowOpen ? '' : 'WINDOW CLOSED during the sample']
            .filter(Boolean)
            .join('; '),
        });
      }
    }
  }
  return F;
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
    `\`${command}\` — guest ${opt.guestMiB} MiB, QEMU TCG, netcheck + memcheck 4 MiB at 1 MB/s; ping ×${opt.pingCount} every ` +
      `${opt.pingIntervalMs} ms; TCP ${opt.tcpSeconds} s per direction and transfer size; migration link ${opt.bandwidthMiB} MiB/s` +
      `${last?.windowMs ? ` (post-copy window of the completing run ${(last.windowMs / 1000).toFixed(1)} s)` : ''}; ` +
      `${os.cpus().length} CPUs, load average ${load} at the end (other work may share this machine: figures are indicative).`,
    '',
    markdownTable(figures(res)),
    '',
    'PASS/MISS compare this run with the target of issue 6 (gate pass-through ≥ 0.8× QEMU tap); findings, not test failures.',
  ].join('\n');
}

async function writePlots(dir: string, res: Results): Promise<string[]> {
  const files: string[] = [];
  const put = async (name: string, spec: Parameters<typeof writeSvg>[1]): Promise<void> => {
    try {
      await writeSvg(path.join(dir, name), spec);
      files.push(name);
    } catch (e) {
      log(`plot ${name} failed: ${(e as Error).message}`);
    }
  };
  const g = res.gate;
  const samples: [string, Sample | undefined][] = [
    ['QEMU tap', res.taps.tap?.sample],
    ['tap vnet_hdr=off', res.taps['tap-novnet']?.sample],
    ['gate before', g?.before],
    ...(g?.gated ?? []).map((s): [string, Sample] => [`gated ${s.intervalMs} ms`, s]),
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
        figures: figures(res),
        taps: res.taps,
        gate: res.gate ?? null,
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
  if (Object.values(res.taps).some((t) => t.error) || res.gate?.error) process.exitCode = 1;
}

await main();
