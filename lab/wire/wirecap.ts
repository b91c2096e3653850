/**
 * Wire capture on the client side of the guest segment, and the check of a capture
 * against the destination gate's release log.
 *
 * Where: the switch bridge in the client namespace has one port per host (SWITCH_PORT_S,
 * SWITCH_PORT_D, see lab/topology.ts). A frame that a port RECEIVES came up that host's
 * uplink, i.e. it left that host's bridge; so the port a frame arrives on tells which
 * host sent it. The capture filter is `inbound and ether src <VM MAC>`: `inbound`
 * leaves out the copies the switch itself forwards out of a port (a broadcast of the
 * source's guest is also sent out of the destination's port).
 *
 * Clocks: every record carries `mono`, CLOCK_MONOTONIC in milliseconds read with
 * process.hrtime in the capture process when libpcap hands the frame over (the `cap`
 * binding does not expose the kernel's pcap timestamp). The gate's release log records
 * `mono` from the same clock in the sidecar, BEFORE it writes the frames to the TAP.
 * CLOCK_MONOTONIC is one clock for the whole machine (network namespaces do not change
 * it), so the two are comparable; wall-clock readings (Date.now) are not, as NTP may
 * step or slew them. The capture reading is later than the frame's real arrival, never
 * earlier: a "captured before released" finding is therefore always real, and a leak is
 * missed only if the frame's release followed the leak within the capture's own
 * latency (well under the 50 ms between checkpoints).
 *
 *   ip netns exec <client ns> node --import tsx lab/wire/wirecap.ts \
 *       --mac 52:54:00:12:34:56 --out frames.jsonl ups upd
 * writes one JSON line per frame: {"port":"upd","mono":81234567.891,"len":98,"hash":"9f2c…","type":"0800"}
 * and "ready" to stdout once every port is open.
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

export interface CapturedFrame {
  port: string;
  mono: number;
  len: number;
  hash: string;
  /** EtherType, 4 hex digits. */
  type: string;
}

/** The same as frameHash of src/gate/gate.ts (the release log's `hashes`). */
const hashOf = (b: Buffer): string => createHash('sha256').update(b).digest('hex').slice(0, 16);
const mono = (): number => Number(process.hrtime.bigint()) / 1e6;

async function main(): Promise<void> {
  const { values: o, positionals: ports } = parseArgs({
    options: { mac: { type: 'string' }, out: { type: 'string' } },
    allowPositionals: true,
  });
  if (!o.mac || !o.out || ports.length === 0) throw new Error('usage: wirecap.ts --mac M --out F port...');
  // cap has no type declarations; PcapHandle below is the part of its API used here
  const { Cap } = createRequire(import.meta.url)('cap') as { Cap: new () => PcapHandle };
  const out = fs.openSync(o.out, 'a');
  const caps: PcapHandle[] = [];
  for (const port of ports) {
    const c = new Cap();
    const buf = Buffer.alloc(65_536);
    c.open(port, `inbound and ether src ${o.mac}`, 8 << 20, buf);
    c.on('packet', (n: number) => {
      const f = buf.subarray(0, n);
      const rec: CapturedFrame = { port, mono: mono(), len: n, hash: hashOf(f), type: f.subarray(12, 14).toString('hex') };
      fs.writeSync(out, JSON.stringify(rec) + '\n');
    });
    caps.push(c);
  }
  const stop = () => {
    for (const c of caps) c.close();
    fs.closeSync(out);
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.stdin.on('end', stop).resume();
  process.stdout.write('ready\n');
}

interface PcapHandle {
  open(device: string, filter: string, bufSize: number, buffer: Buffer): string;
  on(ev: 'packet', fn: (nbytes: number, truncated: boolean) => void): void;
  close(): void;
}

/** A capture running in the client namespace; stop() (or the cluster's cleanup) ends it. */
export class WireCapture {
  readonly #proc: ChildProcess;
  readonly file: string;
  readonly #ready: Promise<void>;

  private constructor(ns: string, dir: string, mac: string, ports: string[]) {
    this.file = path.join(dir, `wirecap-${ports.join('-')}.jsonl`);
    const script = fileURLToPath(import.meta.url);
    this.#proc = spawn(
      'ip',
      ['netns', 'exec', ns, process.execPath, '--import', 'tsx', script, '--mac', mac, '--out', this.file, ...ports],
      {
        stdio: ['pipe', 'pipe', 'pipe'],
        cwd: path.resolve(path.dirname(script), '..'),
      },
    );
    let err = '';
    this.#proc.stderr!.on('data', (d) => (err += d));
    this.#ready = new Promise((resolve, reject) => {
      this.#proc.stdout!.once('data', () => resolve());
      this.#proc.once('exit', (code) => reject(new Error(`wirecap exited (${code}): ${err.slice(-1000)}`)));
    });
  }

  /** Start capturing on `ports` of the switch in namespace `ns`; resolves once libpcap listens. */
  static async start(ns: string, dir: string, mac: string, ports: string[]): Promise<WireCapture> {
    const w = new WireCapture(ns, dir, mac, ports);
    await w.#ready;
    return w;
  }

  /** Frames captured so far (each line is written with one write(2) when captured). */
  frames(): CapturedFrame[] {
    const text = fs.existsSync(this.file) ? fs.readFileSync(this.file, 'utf8') : '';
    return text
      .split('\n')
      .filter((l) => l.endsWith('}'))
      .map((l) => JSON.parse(l) as CapturedFrame);
  }

  kill(): void {
    if (this.#proc.exitCode === null && this.#proc.signalCode === null) this.#proc.kill('SIGKILL');
  }

  async stop(): Promise<void> {
    const p = this.#proc;
    if (p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.stdin!.end();
    const t = setTimeout(() => p.kill('SIGKILL'), 3000);
    await gone;
    clearTimeout(t);
  }
}

/** The gate's release log (<stateDir>/<vm>/net<i>.gate.jsonl, TETHER_GATE_LOG=1). */
export type GateLogRecord =
  | { t: 'release'; epoch: number; mono: number; hashes: string[] }
  | { t: 'discard'; epoch: number; frames: number; mono: number }
  | { t: 'announce'; mono: number; hashes: string[] }
  | { t: 'mode'; mode: 'pass' | 'gated' | 'discarded'; from?: string; epoch: number; mono: number };

export function readGateLog(file: string): GateLogRecord[] {
  const text = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
  return text
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as GateLogRecord);
}

export interface GateCheck {
  /** Frames of the destination that the gate released, each captured after its release. */
  released: number;
  /** Frames captured after the gate turned to pass-through at completion. */
  passed: number;
  /** Frames captured after the fence (they must all be releases from before it). */
  afterFence: number;
  violations: string[];
}

/**
 * Every frame from the VM's MAC that arrived from the destination must be one its gate
 * released (its hash in a release line), captured after that line was written; or, once
 * the gate turned from gated to pass-through (completion), a pass-through frame. A
 * fenced gate writes nothing after its `discarded` line, so a frame after the fence can
 * only be a release from before it. Anything else left the destination before ACK of its
 * epoch (or after the fence): a violation. With the gate forced open (fault gate-open)
 * the gate starts in pass mode and never turns, so every frame it sent is one.
 */
export function checkAgainstGate(frames: readonly CapturedFrame[], log: readonly GateLogRecord[]): GateCheck {
  const releases = new Map<string, { mono: number; epoch: number }[]>();
  for (const r of log) {
    // QEMU's own announce leaves the window at once (it carries no guest state): it is
    // matched like a release, to the relay's line written before it went out
    if (r.t !== 'release' && r.t !== 'announce') continue;
    for (const h of r.hashes) {
      const l = releases.get(h) ?? [];
      l.push({ mono: r.mono, epoch: r.t === 'release' ? r.epoch : 0 });
      releases.set(h, l);
    }
  }
  const passFrom = log.find((r) => r.t === 'mode' && r.mode === 'pass' && r.from === 'gated')?.mono ?? Infinity;
  const fencedAt = log.find((r) => r.t === 'mode' && r.mode === 'discarded')?.mono ?? Infinity;
  const out: GateCheck = { released: 0, passed: 0, afterFence: 0, violations: [] };
  for (const f of [...frames].sort((a, b) => a.mono - b.mono)) {
    if (f.mono > fencedAt) out.afterFence++;
    // identical frames (a repeated ARP request) are matched to their releases in order
    const cands = releases.get(f.hash);
    const i = cands?.findIndex((r) => r.mono <= f.mono) ?? -1;
    if (i >= 0) {
      cands!.splice(i, 1);
      out.released++;
    } else if (f.mono > passFrom && f.mono <= fencedAt) {
      out.passed++;
    } else {
      const later = cands?.[0];
      out.violations.push(
        later
          ? `frame ${f.hash} (type ${f.type}, ${f.len} B) captured ${(later.mono - f.mono).toFixed(1)} ms BEFORE its release (epoch ${later.epoch})`
          : `frame ${f.hash} (type ${f.type}, ${f.len} B) at mono ${f.mono.toFixed(1)} was never released by the gate` +
              (f.mono > fencedAt ? ' (after the fence)' : ''),
      );
    }
  }
  return out;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((e: unknown) => {
    process.stderr.write(`wirecap: ${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}
