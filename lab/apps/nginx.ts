/**
 * The nginx client of the real-application scenarios: Debian's `curl` in the client
 * namespace downloads /big.bin (a deterministic file of the image, its sha256 in the
 * image's manifest) over one connection, its body piped to the test. The test can pause
 * reading: curl then blocks on the pipe, the TCP window closes and nginx waits
 * (send_timeout 600 s in the image), so the same connection stays open across whatever
 * the test does meanwhile — by construction, whatever the machine's speed.
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import type { Test } from 'tap';
import { GUEST_IP } from '../topology.ts';
import { waitFor } from '../proc.ts';
import type { Cluster } from '../cluster.ts';

export const BIG_URL = `http://${GUEST_IP}/big.bin`;

export class Download {
  readonly proc: ChildProcess;
  readonly hash = createHash('sha256');
  bytes = 0;
  stderr = '';
  /** curl's --write-out line: "<http code> <connections made> <bytes>". */
  summary = '';
  #chunks: Buffer[] = [];
  #closed: Promise<number | null>;

  constructor(
    c: Cluster,
    /** Keep the body (for range checks); the file is 32 MiB. */
    readonly keep = true,
  ) {
    // -w goes to stderr (%{stderr}) so stdout is the body alone; --no-buffer: no stdio buffering.
    const args = [
      'netns',
      'exec',
      c.clientNs,
      'curl',
      '-sS',
      '--no-buffer',
      '--fail',
      '-w',
      '%{stderr}\\n%{http_code} %{num_connects} %{size_download}\\n',
      BIG_URL,
    ];
    this.proc = spawn('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc.stdout!.on('data', (d: Buffer) => {
      this.bytes += d.length;
      this.hash.update(d);
      if (this.keep) this.#chunks.push(d);
    });
    this.proc.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString('utf8')));
    this.#closed = new Promise((resolve) => this.proc.on('close', (code) => resolve(code)));
  }

  pause(): void {
    this.proc.stdout!.pause();
  }

  resume(): void {
    this.proc.stdout!.resume();
  }

  get exited(): boolean {
    return this.proc.exitCode !== null || this.proc.signalCode !== null;
  }

  async waitBytes(n: number, what: string): Promise<void> {
    await waitFor(() => {
      if (this.exited && this.bytes < n) throw new Error(`curl ended after ${this.bytes} bytes ${what}: ${this.stderr}`);
      return this.bytes >= n;
    }, `${n} bytes downloaded ${what}`);
  }

  /** Wait for curl to end: its exit code, the sha256 of the body, and its --write-out line. */
  async done(): Promise<{ code: number | null; sha256: string; bytes: number; httpCode: number; connects: number }> {
    const code = await this.#closed;
    const m = /(\d{3}) (\d+) (\d+)\s*$/.exec(this.stderr);
    return { code, sha256: this.hash.digest('hex'), bytes: this.bytes, httpCode: Number(m?.[1]), connects: Number(m?.[2]) };
  }

  body(): Buffer {
    return Buffer.concat(this.#chunks);
  }

  kill(): void {
    if (this.proc.pid && !this.exited) this.proc.kill('SIGKILL');
  }
}

export function startDownload(t: Test, c: Cluster): Download {
  const d = new Download(c);
  t.teardown(() => d.kill());
  return d;
}

/** A Range request over a new connection: the bytes [start, end] of /big.bin. */
export async function fetchRange(c: Cluster, start: number, end: number): Promise<Buffer> {
  const p = spawn('ip', ['netns', 'exec', c.clientNs, 'curl', '-sS', '--fail', '-r', `${start}-${end}`, BIG_URL], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const out: Buffer[] = [];
  let err = '';
  p.stdout!.on('data', (d: Buffer) => out.push(d));
  p.stderr!.on('data', (d: Buffer) => (err += d.toString('utf8')));
  const code = await new Promise<number | null>((resolve) => p.on('close', resolve));
  if (code !== 0) throw new Error(`curl -r ${start}-${end} exited ${code}: ${err}`);
  return Buffer.concat(out);
}

export const TICK_URL = `http://${GUEST_IP}/tick.log`;

/**
 * The read check of nginx (docs/apps.md): the guest appends a line "<n> <time> <random>" to
 * /var/www/html/tick.log every 100 ms (tools/guest/debian/tether-init); this client reads
 * the whole file with curl, one connection per read, one read after the other. Every
 * answer must extend the longest one read before: the state the client saw stays. A
 * shorter answer, or one that differs from it at some byte, means the client was shown
 * state that a rollback undid (the re-executed appends have other times and random bytes),
 * and is recorded in `violations`.
 */
export class TickReader {
  /** Answered reads: when curl started and ended, and the answer's length. */
  readonly reads: { sent: number; t: number; bytes: number }[] = [];
  readonly violations: string[] = [];
  /** Reads without an answer (curl failed or timed out): no observation. */
  readonly failed: string[] = [];
  longest: Buffer = Buffer.alloc(0);
  #stopping = false;
  #current: ChildProcess | undefined;
  #loop: Promise<void>;

  constructor(readonly c: Cluster) {
    this.#loop = this.#run();
  }

  async #run(): Promise<void> {
    while (!this.#stopping) {
      const sent = Date.now();
      // --max-time: a read whose request the rollback took back waits for TCP's SYN retransmits.
      const p = spawn('ip', ['netns', 'exec', this.c.clientNs, 'curl', '-sS', '--fail', '--max-time', '120', TICK_URL], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      this.#current = p;
      const out: Buffer[] = [];
      let err = '';
      p.stdout!.on('data', (d: Buffer) => out.push(d));
      p.stderr!.on('data', (d: Buffer) => (err += d.toString('utf8')));
      const code = await new Promise<number | null>((resolve) => p.on('close', resolve));
      if (code !== 0) {
        this.failed.push(`curl exit ${code}: ${err.trim().slice(0, 200)}`);
        continue;
      }
      this.#check(Buffer.concat(out), sent);
    }
  }

  #check(body: Buffer, sent: number): void {
    this.reads.push({ sent, t: Date.now(), bytes: body.length });
    const n = Math.min(body.length, this.longest.length);
    const at = body.subarray(0, n).equals(this.longest.subarray(0, n)) ? -1 : firstDiff(body, this.longest);
    const line = (b: Buffer, i: number) => b.subarray(b.lastIndexOf(10, i - 1) + 1, b.indexOf(10, i)).toString('latin1');
    if (at >= 0) this.violations.push(`byte ${at} differs: read "${line(body, at)}", earlier "${line(this.longest, at)}"`);
    else if (body.length < this.longest.length)
      this.violations.push(`shorter than an earlier read: ${body.length} bytes after ${this.longest.length}`);
    if (body.length > this.longest.length) this.longest = body;
  }

  /**
   * Whether the client read state the guest wrote after serving a read sent at or after
   * `since`: a read sent after the answer of the first such read is longer than it.
   */
  grewAfterReadSince(since: number): boolean {
    const first = this.reads.find((r) => r.sent >= since);
    return first !== undefined && this.reads.some((r) => r.sent >= first.t && r.bytes > first.bytes);
  }

  readsSince(since: number): number {
    return this.reads.filter((r) => r.sent >= since).length;
  }

  async waitReads(count: number, what: string, since = 0): Promise<void> {
    await waitFor(() => this.readsSince(since) >= count, `${count} reads of tick.log answered ${what}`);
  }

  /** Let the read in flight finish and stop. */
  async stop(): Promise<void> {
    this.#stopping = true;
    await this.#loop;
  }

  /**
   * End the read in flight (no observation) and go on with the next one. After a rollback
   * with the gate forced open, a read whose request the destination's guest had acknowledged
   * (through the open gate) would wait for curl's --max-time: the client's TCP has nothing to
   * retransmit, and the restored guest never saw the connection.
   */
  abortInFlight(): void {
    if (this.#current?.pid && this.#current.exitCode === null) this.#current.kill('SIGKILL');
  }

  kill(): void {
    this.#stopping = true;
    this.abortInFlight();
  }
}

function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return -1;
}

export function startTickReader(t: Test, c: Cluster): TickReader {
  const r = new TickReader(c);
  t.teardown(() => r.kill());
  return r;
}
