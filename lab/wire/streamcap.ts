/**
 * Capture of the QEMU migration stream on the migration link, searched for a byte pattern.
 *
 * Runs in a host's namespace (libpcap through the `cap` package, as wirecap.ts) on the
 * migration veth, with the filter `tcp and portrange <lo>-<hi>` (the destination's
 * migration ports: both directions of QEMU's stream, nothing of the peer channel on 7700).
 * Each TCP segment's payload is searched for the pattern, with the last pattern-1 bytes of
 * the previous segment of the same direction in front, so a match split over two segments
 * counts too. The capture keeps no payload: it counts.
 *
 *   ip netns exec <ns> node --import tsx lab/wire/streamcap.ts \
 *       --dev <veth> --ports 49152-49160 --pattern 636d726568746574
 * prints "ready" once libpcap listens, and on end of stdin (or SIGTERM) one JSON line:
 *   {"segments":N,"payloadBytes":N,"matches":N,"ports":[...]}
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

export interface StreamCapture {
  /** TCP segments with payload seen. */
  segments: number;
  payloadBytes: number;
  /** Occurrences of the pattern in the payload. */
  matches: number;
  /** The local (migration) ports the segments used. */
  ports: number[];
}

interface PcapHandle {
  open(device: string, filter: string, bufSize: number, buffer: Buffer): string;
  on(ev: 'packet', fn: (nbytes: number, truncated: boolean) => void): void;
  close(): void;
}

/** Occurrences of `pat` in `buf` (overlapping ones too). */
export function countPattern(buf: Buffer, pat: Buffer): number {
  let n = 0;
  for (let i = buf.indexOf(pat); i >= 0; i = buf.indexOf(pat, i + 1)) n++;
  return n;
}

/** The TCP payload of an Ethernet/IPv4 frame, with its ports; null for anything else. */
export function tcpPayload(f: Buffer): { src: number; dst: number; data: Buffer } | null {
  if (f.length < 14 + 20 || f.readUInt16BE(12) !== 0x0800) return null;
  const ip = f.subarray(14);
  const ihl = (ip[0]! & 0x0f) * 4;
  if (ip[9] !== 6 || ip.length < ihl + 20) return null;
  const total = Math.min(ip.readUInt16BE(2) || ip.length, ip.length); // 0 with TSO: up to the capture
  const tcp = ip.subarray(ihl, total);
  const off = (tcp[12]! >> 4) * 4;
  return { src: tcp.readUInt16BE(0), dst: tcp.readUInt16BE(2), data: tcp.subarray(off) };
}

async function main(): Promise<void> {
  const { values: o } = parseArgs({ options: { dev: { type: 'string' }, ports: { type: 'string' }, pattern: { type: 'string' } } });
  if (!o.dev || !o.ports || !o.pattern) throw new Error('usage: streamcap.ts --dev D --ports LO-HI --pattern HEX');
  const [lo, hi] = o.ports.split('-').map(Number) as [number, number];
  const pat = Buffer.from(o.pattern, 'hex');
  const { Cap } = createRequire(import.meta.url)('cap') as { Cap: new () => PcapHandle };
  const c = new Cap();
  const buf = Buffer.alloc(65_536 + 256);
  c.open(o.dev, `tcp and portrange ${lo}-${hi}`, 64 << 20, buf);
  const out: StreamCapture = { segments: 0, payloadBytes: 0, matches: 0, ports: [] };
  const ports = new Set<number>();
  const tails = new Map<string, Buffer>();
  c.on('packet', (n: number) => {
    const seg = tcpPayload(buf.subarray(0, n));
    if (!seg || seg.data.length === 0) return;
    out.segments++;
    out.payloadBytes += seg.data.length;
    ports.add(seg.src >= lo && seg.src <= hi ? seg.src : seg.dst);
    const flow = `${seg.src}>${seg.dst}`;
    const joined = Buffer.concat([tails.get(flow) ?? Buffer.alloc(0), seg.data]);
    out.matches += countPattern(joined, pat);
    // keep fewer bytes than the pattern: a match is never counted twice
    tails.set(flow, Buffer.from(joined.subarray(Math.max(0, joined.length - (pat.length - 1)))));
  });
  let done = false;
  const stop = () => {
    if (done) return;
    done = true;
    c.close();
    out.ports = [...ports].sort((a, b) => a - b);
    process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.stdin.on('end', stop).resume();
  process.stdout.write('ready\n');
}

/** A capture running in a namespace; stop() returns what it counted. */
export class StreamCapturer {
  readonly #proc: ChildProcess;
  #out = '';
  #err = '';
  readonly #ready: Promise<void>;
  readonly #exited: Promise<void>;

  private constructor(ns: string, dev: string, ports: [number, number], pattern: Buffer) {
    const script = fileURLToPath(import.meta.url);
    const args = ['--dev', dev, '--ports', `${ports[0]}-${ports[1]}`, '--pattern', pattern.toString('hex')];
    this.#proc = spawn('ip', ['netns', 'exec', ns, process.execPath, '--import', 'tsx', script, ...args], {
      stdio: ['pipe', 'pipe', 'pipe'],
      cwd: path.resolve(path.dirname(script), '..'),
    });
    this.#proc.stdout!.on('data', (d) => (this.#out += d));
    this.#proc.stderr!.on('data', (d) => (this.#err += d));
    this.#exited = new Promise((r) => this.#proc.once('exit', () => r()));
    this.#ready = new Promise((resolve, reject) => {
      this.#proc.stdout!.once('data', () => resolve());
      this.#proc.once('exit', (code) => reject(new Error(`streamcap exited (${code}): ${this.#err.slice(-1000)}`)));
    });
  }

  static async start(ns: string, dev: string, ports: [number, number], pattern: Buffer): Promise<StreamCapturer> {
    const s = new StreamCapturer(ns, dev, ports, pattern);
    await s.#ready;
    return s;
  }

  async stop(): Promise<StreamCapture> {
    this.#proc.stdin!.end();
    const t = setTimeout(() => this.#proc.kill('SIGKILL'), 10_000);
    await this.#exited;
    clearTimeout(t);
    const line = this.#out.trim().split('\n').pop() ?? '';
    try {
      return JSON.parse(line) as StreamCapture;
    } catch {
      throw new Error(`streamcap gave no result: ${this.#out.slice(-500)} ${this.#err.slice(-1000)}`);
    }
  }

  kill(): void {
    if (this.#proc.exitCode === null && this.#proc.signalCode === null) this.#proc.kill('SIGKILL');
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((e: unknown) => {
    process.stderr.write(`streamcap: ${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}
