/**
 * The memcached client of the real-application scenarios: Debian's libmemcached-tools in
 * the client namespace. `memccp --set` stores one unique key with a random value per run
 * (its file's name is the key, its bytes the value) and exits 0 only once the server
 * answered STORED; the writer runs them one after the other. verifyKeys() reads every
 * stored key back with `memccat` from whichever host runs the VM.
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Test } from 'tap';
import { GUEST_IP } from '../topology.ts';
import { waitFor } from '../proc.ts';
import type { Cluster } from '../cluster.ts';

export const MEMCACHED_PORT = 11211;
const SERVERS = `--servers=${GUEST_IP}:${MEMCACHED_PORT}`;

function run(c: Cluster, args: string[]): { proc: ChildProcess; done: Promise<{ code: number | null; out: Buffer; err: string }> } {
  const proc = spawn('ip', ['netns', 'exec', c.clientNs, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const out: Buffer[] = [];
  let err = '';
  proc.stdout!.on('data', (d: Buffer) => out.push(d));
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString('utf8')));
  const done = new Promise<{ code: number | null; out: Buffer; err: string }>((resolve) =>
    proc.on('close', (code) => resolve({ code, out: Buffer.concat(out), err })),
  );
  return { proc, done };
}

export class MemcachedWriter {
  /** key -> value of every key whose set the server acknowledged (STORED), when memccp started and when it ended. */
  readonly stored = new Map<string, { value: string; sent: number; t: number }>();
  readonly failed: string[] = [];
  readonly dir: string;
  #seq = 0;
  #stopping = false;
  #current: ChildProcess | undefined;
  #loop: Promise<void>;

  constructor(readonly c: Cluster) {
    this.dir = fs.mkdtempSync(path.join(c.dir, 'memcached-'));
    this.#loop = this.#run();
  }

  async #run(): Promise<void> {
    while (!this.#stopping) {
      const key = `tether-${process.pid}-${++this.#seq}`;
      const value = randomBytes(24).toString('hex');
      const file = path.join(this.dir, key);
      fs.writeFileSync(file, value);
      const sent = Date.now();
      const r = run(this.c, ['memccp', '--set', SERVERS, file]);
      this.#current = r.proc;
      const { code, err } = await r.done;
      if (code === 0) this.stored.set(key, { value, sent, t: Date.now() });
      // A set without STORED (a timeout, a lost connection) is not acknowledged: it may or may not be there.
      else this.failed.push(`${key}: exit ${code}: ${err.trim().slice(0, 300)}`);
    }
  }

  storedSince(since: number): number {
    let n = 0;
    for (const s of this.stored.values()) if (s.t >= since) n++;
    return n;
  }

  /** Keys STORED whose memccp started at or after `since`. */
  storedSentSince(since: number): number {
    let n = 0;
    for (const s of this.stored.values()) if (s.sent >= since) n++;
    return n;
  }

  async waitStored(count: number, what: string, since = 0): Promise<void> {
    await waitFor(() => this.storedSince(since) >= count, `${count} memcached keys STORED ${what}`);
  }

  /** Let the set in flight finish and stop. */
  async stop(): Promise<void> {
    this.#stopping = true;
    await this.#loop;
  }

  kill(): void {
    this.#stopping = true;
    if (this.#current?.pid && this.#current.exitCode === null) this.#current.kill('SIGKILL');
  }
}

export function startMemcachedWriter(t: Test, c: Cluster): MemcachedWriter {
  const w = new MemcachedWriter(c);
  t.teardown(() => w.kill());
  return w;
}

/** Read every STORED key back (memccat, 16 at a time): returns the keys missing or with another value. */
export async function verifyKeys(c: Cluster, w: MemcachedWriter): Promise<string[]> {
  const lost: string[] = [];
  const keys = [...w.stored.keys()];
  for (let i = 0; i < keys.length; i += 16) {
    await Promise.all(
      keys.slice(i, i + 16).map(async (key) => {
        const { code, out, err } = await run(c, ['memccat', SERVERS, key]).done;
        const want = w.stored.get(key)!.value;
        // memccat ends each value with a newline of its own
        const got = out.toString('utf8').replace(/\n$/, '');
        if (code !== 0) lost.push(`${key}: memccat exit ${code}: ${err.trim().slice(0, 200)}`);
        else if (got !== want) lost.push(`${key}: value ${got.slice(0, 60)} != ${want}`);
      }),
    );
  }
  return lost;
}
