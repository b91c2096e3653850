/**
 * The test side of lab/net/netclient.ts: start it in a cluster's client namespace and follow
 * its JSON-line events (also written to a log file), so a test or the demo can wait on
 * verified answers, violations and summaries.
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { waitFor } from '../proc.ts';
import { GUEST_IP, NETCHECK_PORT, ROOT } from '../topology.ts';

export interface NetEvent {
  t: number;
  ev: string;
  [k: string]: any;
}

/**
 * A running netclient (lab/net/netclient.ts): collects its JSON-line events (also
 * written to `log`) and lets a test wait on them.
 */
export class NetClient {
  readonly events: NetEvent[] = [];
  readonly stderr: string[] = [];
  #exited: Promise<void>;
  #listeners = new Set<(e: NetEvent) => void>();

  constructor(
    readonly proc: ChildProcess,
    readonly log: string,
  ) {
    let buf = '';
    proc.stdout!.on('data', (d: Buffer) => {
      fs.appendFileSync(log, d);
      buf += d.toString('utf8');
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          const e = JSON.parse(line) as NetEvent;
          this.events.push(e);
          for (const l of this.#listeners) l(e);
        } catch {
          this.stderr.push(`unparsable: ${line}`);
        }
      }
    });
    proc.stderr!.on('data', (d: Buffer) => this.stderr.push(d.toString('utf8')));
    this.#exited = new Promise((resolve) => proc.once('exit', () => resolve()));
  }

  get violations(): NetEvent[] {
    return this.events.filter((e) => e.ev === 'violation');
  }

  answers(since = 0): NetEvent[] {
    return this.events.filter((e) => e.ev === 'answer' && e.t >= since);
  }

  get exited(): boolean {
    return this.proc.exitCode !== null || this.proc.signalCode !== null;
  }

  command(line: string): void {
    this.proc.stdin!.write(line + '\n');
  }

  /** Wait for `count` verified answers that arrived at or after `since` (ms epoch). */
  async waitAnswers(count: number, what: string, since = 0, timeoutMs?: number): Promise<void> {
    await waitFor(
      () => {
        if (this.exited) throw new Error(`netclient exited while waiting for ${what}: ${this.stderr.join('').slice(-1500)}`);
        return this.answers(since).length >= count;
      },
      `${count} verified answers ${what} (${this.log})`,
      timeoutMs,
    );
  }

  /** Resolves as soon as the next event matching `pred` arrives (no polling delay). */
  next(pred: (e: NetEvent) => boolean): Promise<NetEvent> {
    return new Promise((resolve) => {
      const l = (e: NetEvent) => {
        if (!pred(e)) return;
        this.#listeners.delete(l);
        resolve(e);
      };
      this.#listeners.add(l);
    });
  }

  async waitEvent(pred: (e: NetEvent) => boolean, what: string, timeoutMs?: number): Promise<NetEvent> {
    let found: NetEvent | undefined;
    await waitFor(
      () => {
        found = this.events.find(pred);
        if (!found && this.exited) throw new Error(`netclient exited while waiting for ${what}`);
        return !!found;
      },
      `${what} (${this.log})`,
      timeoutMs,
    );
    return found!;
  }

  /** Ask the client to stop and wait for its summary. */
  async stop(): Promise<void> {
    if (!this.exited) {
      try {
        this.command('stop');
      } catch {
        /* stdin gone */
      }
      const timer = setTimeout(() => this.kill(), 5000);
      await this.#exited;
      clearTimeout(timer);
    }
  }

  kill(): void {
    if (this.proc.pid && !this.exited) {
      try {
        process.kill(this.proc.pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
  }
}

export interface NetclientOptions {
  intervalMs?: number;
  stallMs?: number;
  udpPort?: number;
}

/** Start a verifying netcheck client in namespace `ns`; its events go to `log` too. */
export function spawnNetclient(ns: string, log: string, opts: NetclientOptions = {}): NetClient {
  const args = [
    'netns',
    'exec',
    ns,
    process.execPath,
    '--import',
    'tsx',
    path.join(ROOT, 'lab', 'net', 'netclient.ts'),
    '--host',
    GUEST_IP,
    '--port',
    String(NETCHECK_PORT),
    '--interval-ms',
    String(opts.intervalMs ?? 100),
    '--stall-ms',
    String(opts.stallMs ?? 45_000),
    '--udp-port',
    String(opts.udpPort ?? 7001),
  ];
  const p = spawn('ip', args, { stdio: ['pipe', 'pipe', 'pipe'], cwd: ROOT });
  return new NetClient(p, log);
}
