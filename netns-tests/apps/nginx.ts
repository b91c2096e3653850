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
import { GUEST_IP, waitFor } from '../harness.ts';
import type { Cluster } from '../harness.ts';

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
