/**
 * The network benchmark's options (from the command line), targets, output paths and process helpers.
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { ROOT } from '../../../lab/topology.ts';
import { arg, str } from '../args.ts';
import { LINKS, type Link } from '../lib.ts';

export const quick = process.argv.includes('--quick');
export const num = arg;
export const list = (name: string, def: string): string[] => str(name, def).split(',').filter(Boolean);
export const only = new Set(list('only', quick ? 'tap,gate' : 'tap,tap-novnet,gate'));
/** `--only rtt`: the gate cluster's ping RTT alone (no TCP, no tap clusters). */
export const rttOnly = only.has('rtt');
if (rttOnly) only.add('gate');
export const opt = {
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
  /**
   * Steady state: rounds of the plain tap's sample and the gate cluster's (before migration),
   * alternating, each figure the median round's. Both are QEMU's own tap in steady state, so
   * what differs between single samples is host load.
   */
  steadyRounds: num('steady-rounds', 1),
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
  /**
   * Extra guest kernel parameters, the same on every cluster of the run (tap and gate alike),
   * e.g. `tcp_cubic.hystart_detect=0` or `sysctl.net.ipv4.tcp_wmem=\"4096 16384 16777216\"`:
   * how the guest's own TCP copes with output commit's holds is the guest's setting, not
   * tether's (docs/network.md "TCP inside the window").
   */
  guestAppend: str('guest-append', ''),
  /**
   * sysctls of the client's network namespace, `key=value` separated by `;`, e.g.
   * `net.ipv4.tcp_congestion_control=reno;net.ipv4.tcp_wmem=4096 16384 33554432`: the
   * client is the outside world, whose TCP (for client → guest, the sender) meets output
   * commit's held ACKs. A new namespace takes this host's congestion control (here BBR) and
   * its own tcp_wmem default (4 MiB); outside the initial namespace Linux lets it choose
   * only the algorithms in net.ipv4.tcp_allowed_congestion_control (here reno and bbr).
   */
  clientSysctl: str('client-sysctl', '')
    .split(';')
    .filter(Boolean)
    .map((kv) => {
      const i = kv.indexOf('=');
      if (i <= 0 || !/^net\.[a-z0-9_.]+$/.test(kv.slice(0, i).trim()))
        throw new Error(`--client-sysctl: key=value;... (net.* keys), got ${kv}`);
      return [kv.slice(0, i).trim(), kv.slice(i + 1).trim()] as const;
    }),
  only,
};
for (const l of opt.gatedLinks) if (!(l in LINKS)) throw new Error(`--gated-links: one of ${Object.keys(LINKS).join(', ')}`);
for (const l of opt.stallLinks) if (!(l in LINKS)) throw new Error(`--stall-links: one of ${Object.keys(LINKS).join(', ')}`);
for (const v of [...opt.sizes, ...opt.intervals])
  if (!Number.isInteger(v) || v <= 0) throw new Error('--sizes/--intervals: positive integers');

export const MiB = 1024 * 1024;
/** Steady state (QEMU's tap on the sidecar's TAP, no relay) relative to a plain `-netdev tap,vnet_hdr=on` (issue 16). */
export const TARGET_RATIO = 0.95;
/** Inside the destination's window (filter-redirectors, relay, gate) relative to a plain tap (issue 16). */
export const TARGET_GATED_RATIO = 0.8;
export const OUT_DIR = path.join(ROOT, 'bench-results');
export const STARTED = new Date().toISOString();
export const RUN_DIR = path.join(OUT_DIR, `net-${STARTED.replaceAll(':', '').replace(/\.\d+Z$/, 'Z')}`);
export const LOG_DIR = path.join(RUN_DIR, 'logs');
export const CLIENT = path.join(ROOT, 'lab', 'net', 'bulk-client.ts');
export const PING_WAIT_S = 3;

export const now = (): number => performance.now();
export const r2 = (v: number): number => Math.round(v * 100) / 100;
export function log(s: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 23)}] ${s}\n`);
}

export function run(cmd: string, args: string[], timeoutMs: number): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 16 * MiB }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code ?? 1) : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}
