/**
 * Network-namespace harness: two hosts (source S, destination D) on one
 * machine, linked by a veth pair, each running its own tether daemon with its
 * own state dir, real QEMU (TCG) and the memcheck guest. Everything it creates
 * is removed in teardown, also when the test fails or is interrupted.
 */
import { execFileSync, spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TETHER = path.join(ROOT, 'bin', 'tether.mjs');
export const GUEST = path.join(ROOT, '.cache', 'guest', 'current');

export interface Host {
  role: 'source' | 'destination';
  name: string;
  ns: string;
  addr: string;
  config: string;
  socket: string;
  stateDir: string;
  ramDir: string;
  daemonLog: string;
  daemon?: ChildProcess;
}

export interface ClusterOptions {
  /** TETHER_FAULTS for each daemon. */
  faults?: { source?: string; destination?: string };
  /** Give the destination a different peer key than the source (an impostor). */
  mismatchedKeys?: boolean;
  /** Overrides merged into the VM YAML. */
  vm?: {
    memcheckMiB?: number;
    memcheckMBps?: number;
    maxBandwidth?: number;
    intervalMs?: number;
    failoverTimeoutMs?: number;
    fenceTimeoutMs?: number;
    hotStandby?: boolean;
    memoryMiB?: number;
  };
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

let counter = 0;
const live = new Set<Cluster>();

export function sh(cmd: string, args: string[], opts: { allowFail?: boolean } = {}): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    if (opts.allowFail) return '';
    const err = e as { stderr?: string; message: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${err.stderr ?? err.message}`);
  }
}

export class Cluster {
  readonly id: string;
  readonly dir: string;
  readonly src: Host;
  readonly dst: Host;
  readonly vmConfig: string;
  readonly vmName = 'vm1';
  #cleaned = false;

  constructor(readonly opts: ClusterOptions = {}) {
    const n = (process.pid % 200) + ++counter;
    this.id = `tt${process.pid}x${counter}`;
    this.dir = fs.mkdtempSync(`/tmp/tether-${this.id}-`);
    const mk = (role: Host['role'], suffix: string, addr: string): Host => ({
      role,
      name: role === 'source' ? 'host-s' : 'host-d',
      ns: `${this.id}${suffix}`,
      addr,
      config: path.join(this.dir, `${suffix}.yaml`),
      socket: path.join(this.dir, `${suffix}.sock`),
      stateDir: path.join(this.dir, `state-${suffix}`),
      ramDir: `/dev/shm/tether-${this.id}/${suffix}`,
      daemonLog: path.join(this.dir, `daemon-${suffix}.log`),
    });
    const net3 = 10 + (n % 240);
    this.src = mk('source', 's', `10.77.${net3}.1`);
    this.dst = mk('destination', 'd', `10.77.${net3}.2`);
    this.vmConfig = path.join(this.dir, 'vm1.yaml');
  }

  serialLog(h: Host): string {
    return path.join(h.stateDir, this.vmName, 'serial.log');
  }

  async up(): Promise<void> {
    sweepStale();
    live.add(this);
    const { src, dst, id } = this;
    sh('ip', ['netns', 'add', src.ns]);
    sh('ip', ['netns', 'add', dst.ns]);
    sh('ip', ['link', 'add', `${id}a`, 'type', 'veth', 'peer', 'name', `${id}b`]);
    sh('ip', ['link', 'set', `${id}a`, 'netns', src.ns]);
    sh('ip', ['link', 'set', `${id}b`, 'netns', dst.ns]);
    for (const [h, ifc] of [
      [src, `${id}a`],
      [dst, `${id}b`],
    ] as const) {
      sh('ip', ['-n', h.ns, 'addr', 'add', `${h.addr}/24`, 'dev', ifc]);
      sh('ip', ['-n', h.ns, 'link', 'set', ifc, 'up']);
      sh('ip', ['-n', h.ns, 'link', 'set', 'lo', 'up']);
    }
    for (const h of [src, dst]) {
      const keyFile = path.join(this.dir, this.opts.mismatchedKeys ? `peer-${h.role}.key` : 'peer.key');
      if (!fs.existsSync(keyFile)) fs.writeFileSync(keyFile, randomBytes(32).toString('base64') + '\n', { mode: 0o600 });
      fs.writeFileSync(
        h.config,
        [
          `name: ${h.name}`,
          `stateDir: ${h.stateDir}`,
          `ramDir: ${h.ramDir}`,
          `controlSocket: ${h.socket}`,
          `peer:`,
          `  listen: "${h.addr}:7700"`,
          `  keyFile: ${keyFile}`,
          `migration:`,
          `  listenHost: ${h.addr}`,
          `  portRange: [49152, 49160]`,
          `metrics: "${h.addr}:9700"`,
          `logLevel: debug`,
          '',
        ].join('\n'),
      );
    }
    const v = this.opts.vm ?? {};
    fs.writeFileSync(
      this.vmConfig,
      [
        `name: ${this.vmName}`,
        `memoryMiB: ${v.memoryMiB ?? 512}`,
        `kernel: ${path.join(GUEST, 'vmlinuz')}`,
        `initrd: ${path.join(GUEST, 'initrd.img')}`,
        `append: "console=ttyS0 quiet panic=-1 tether.run=memcheck:${v.memcheckMiB ?? 96}:${v.memcheckMBps ?? 32}"`,
        `checkpoint:`,
        `  intervalMs: ${v.intervalMs ?? 50}`,
        `  failoverTimeoutMs: ${v.failoverTimeoutMs ?? 8000}`,
        `  fenceTimeoutMs: ${v.fenceTimeoutMs ?? 4000}`,
        `migration:`,
        `  maxBandwidth: ${v.maxBandwidth ?? 16 * 1024 * 1024}`,
        `  hotStandby: ${v.hotStandby ?? true}`,
        '',
      ].join('\n'),
    );
    for (const h of [src, dst]) this.#startDaemon(h);
    await Promise.all([src, dst].map((h) => waitForSocket(h)));
  }

  /** SIGKILL one host's sidecar only (its QEMU processes keep running). */
  async killDaemon(h: Host): Promise<void> {
    const d = h.daemon;
    if (!d?.pid || d.exitCode !== null) return;
    const gone = waitExit(d, 10_000);
    process.kill(d.pid, 'SIGKILL');
    await gone;
  }

  /** Start a host's sidecar again (after killDaemon) and wait for its control socket. */
  async restartDaemon(h: Host): Promise<void> {
    this.#startDaemon(h);
    await waitForSocket(h);
  }

  #startDaemon(h: Host): void {
    const log = fs.openSync(h.daemonLog, 'a');
    const faults = h.role === 'source' ? this.opts.faults?.source : this.opts.faults?.destination;
    h.daemon = spawn('ip', ['netns', 'exec', h.ns, process.execPath, TETHER, 'daemon', '--config', h.config], {
      stdio: ['ignore', log, log],
      detached: true,
      env: { ...process.env, ...(faults ? { TETHER_FAULTS: faults } : {}) },
    });
    fs.closeSync(log);
  }

  /** Run the tether CLI against a host's daemon. */
  tether(h: Host, args: string[]): Promise<RunResult> {
    return new Promise((resolve) => {
      const p = spawn(process.execPath, [TETHER, ...args, '--socket', h.socket], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      p.stdout.on('data', (d) => (stdout += d));
      p.stderr.on('data', (d) => (stderr += d));
      p.on('close', (code) => resolve({ code, stdout, stderr }));
    });
  }

  /** Scrape a host's Prometheus endpoint from inside its namespace. */
  metrics(h: Host): string {
    const js = `fetch('http://${h.addr}:9700/metrics').then((r) => r.text()).then((t) => process.stdout.write(t))`;
    return sh('ip', ['netns', 'exec', h.ns, process.execPath, '-e', js]);
  }

  async status(h: Host): Promise<Record<string, any>> {
    const r = await this.tether(h, ['status', this.vmName, '--json']);
    if (r.code !== 0) return { state: 'absent', error: r.stderr };
    return JSON.parse(r.stdout);
  }

  /**
   * Start the migration in the background; resolves with the CLI's exit code, final JSON
   * and the progress records it printed before (source-side, `t` in ms since the start).
   */
  migrate(): Promise<{ code: number | null; result: Record<string, any> | null; stderr: string; progress: Record<string, any>[] }> {
    return this.tether(this.src, ['migrate', this.vmName, '--to', `${this.dst.addr}:7700`, '--json']).then((r) => {
      const lines = r.stdout.trim().split('\n');
      const last = lines.pop() ?? '';
      let result: Record<string, any> | null = null;
      try {
        result = JSON.parse(last);
      } catch {
        /* left null: the test reports stderr */
      }
      const progress: Record<string, any>[] = [];
      for (const l of lines) {
        try {
          const p = JSON.parse(l) as { progress?: Record<string, any> };
          if (p.progress) progress.push(p.progress);
        } catch {
          /* not a JSON line */
        }
      }
      return { code: r.code, result, stderr: r.stderr, progress };
    });
  }

  /** Bring the migration link back up after linkDown(). */
  linkUp(): void {
    sh('ip', ['-n', this.src.ns, 'link', 'set', `${this.id}a`, 'up']);
  }

  /** Cut the migration link (both the QEMU stream and the checkpoint channel). */
  linkDown(): void {
    sh('ip', ['-n', this.src.ns, 'link', 'set', `${this.id}a`, 'down']);
  }

  /** Drop every packet between the hosts with nftables, link stays up. */
  nftDrop(): void {
    const rules = `table inet tether_fault {
  chain in { type filter hook input priority -10; policy accept; ip saddr ${this.dst.addr} drop; }
  chain out { type filter hook output priority -10; policy accept; ip daddr ${this.dst.addr} drop; }
}
`;
    const file = path.join(this.dir, 'fault.nft');
    fs.writeFileSync(file, rules);
    sh('ip', ['netns', 'exec', this.src.ns, 'nft', '-f', file]);
  }

  async cleanup(): Promise<void> {
    if (this.#cleaned) return;
    this.#cleaned = true;
    for (const h of [this.src, this.dst]) {
      if (h.daemon?.pid && h.daemon.exitCode === null) {
        try {
          process.kill(-h.daemon.pid, 'SIGTERM');
        } catch {
          /* gone */
        }
      }
    }
    await Promise.all(
      [this.src, this.dst].map((h) => (h.daemon && h.daemon.exitCode === null ? waitExit(h.daemon, 5000) : Promise.resolve())),
    );
    this.cleanupSync();
  }

  /** Synchronous part of cleanup: also run from process exit handlers. */
  cleanupSync(): void {
    for (const h of [this.src, this.dst]) {
      if (h.daemon?.pid) {
        try {
          process.kill(-h.daemon.pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }
    // QEMU processes of this cluster: their command lines name the cluster's dirs
    sh('pkill', ['-9', '-f', `qemu-system.*tether-${this.id}[-/]`], { allowFail: true });
    for (const h of [this.src, this.dst]) sh('ip', ['netns', 'del', h.ns], { allowFail: true });
    fs.rmSync(`/dev/shm/tether-${this.id}`, { recursive: true, force: true });
    if (!process.env.TETHER_KEEP_TEST_DIRS) fs.rmSync(this.dir, { recursive: true, force: true });
    live.delete(this);
  }
}

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    for (const c of live) c.cleanupSync();
    process.exit(130);
  });
}
process.once('exit', () => {
  for (const c of live) c.cleanupSync();
});

/**
 * Remove what an earlier run left behind when it was killed too hard to clean
 * up (SIGKILL): namespaces, QEMU processes and RAM files named after a test
 * process that no longer exists.
 */
export function sweepStale(): void {
  const owners = new Set<string>();
  for (const line of sh('ip', ['netns', 'list'], { allowFail: true }).split('\n')) {
    const m = /^(tt(\d+)x\d+)[sd]\b/.exec(line);
    if (m && !pidAlive(Number(m[2]))) owners.add(m[1]!);
  }
  for (const f of fs.readdirSync('/dev/shm')) {
    const m = /^tether-(tt(\d+)x\d+)$/.exec(f);
    if (m && !pidAlive(Number(m[2]))) owners.add(m[1]!);
  }
  for (const id of owners) {
    sh('pkill', ['-9', '-f', `tether-${id}-.*/[sd]\\.yaml`], { allowFail: true }); // daemons
    sh('pkill', ['-9', '-f', `qemu-system.*tether-${id}[-/]`], { allowFail: true });
    for (const suffix of ['s', 'd']) sh('ip', ['netns', 'del', `${id}${suffix}`], { allowFail: true });
    fs.rmSync(`/dev/shm/tether-${id}`, { recursive: true, force: true });
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function waitExit(p: ChildProcess, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    p.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

async function waitForSocket(h: Host): Promise<void> {
  await waitFor(
    () =>
      new Promise<boolean>((resolve) => {
        const s = net.createConnection(h.socket);
        s.once('connect', () => {
          s.destroy();
          resolve(true);
        });
        s.once('error', () => resolve(false));
      }),
    `daemon ${h.name} control socket (log: ${h.daemonLog})`,
    30_000,
  );
}

/**
 * Poll until `fn` is true. The deadline only keeps a broken run from hanging
 * forever; it is generous on purpose and is not a performance assertion.
 */
export async function waitFor(fn: () => boolean | Promise<boolean>, what: string, timeoutMs = 300_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await fn()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export interface MemcheckReport {
  /** Pass numbers reported ok, in log order. */
  passes: number[];
  /** Lines reporting corruption. */
  corrupt: string[];
  started: number;
}

/** Parse memcheck's lines from a serial log (from byte `from` on). */
export function memcheck(serialLog: string, from = 0): MemcheckReport {
  let text = '';
  try {
    text = fs.readFileSync(serialLog).subarray(from).toString('latin1');
  } catch {
    /* not there yet */
  }
  const passes: number[] = [];
  const corrupt: string[] = [];
  let started = 0;
  for (const line of text.split(/\r?\n/)) {
    const ok = /memcheck pass (\d+) ok/.exec(line);
    if (ok) passes.push(Number(ok[1]));
    if (/CORRUPT/.test(line)) corrupt.push(line);
    if (/memcheck start/.test(line)) started++;
  }
  return { passes, corrupt, started };
}

export function fileSize(p: string): number {
  try {
    return fs.statSync(p).size;
  } catch {
    return 0;
  }
}

/** Wait for `count` more completed memcheck passes in the log after byte `from`. */
export async function waitPasses(serialLog: string, from: number, count: number, what: string): Promise<MemcheckReport> {
  let rep = memcheck(serialLog, from);
  await waitFor(() => {
    rep = memcheck(serialLog, from);
    return rep.passes.length >= count || rep.corrupt.length > 0;
  }, `${count} memcheck passes ${what} (${serialLog})`);
  return rep;
}

/** Live QEMU processes whose command line contains `needle` (a RAM file's mem-path=, a socket path). */
export function qemuPidsWith(needle: string): number[] {
  const out: number[] = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const argv = fs.readFileSync(`/proc/${d}/cmdline`, 'latin1').split('\0');
      if (/qemu-system/.test(argv[0] ?? '') && argv.some((a) => a.includes(needle))) out.push(Number(d));
    } catch {
      /* gone meanwhile */
    }
  }
  return out;
}

export function qemuAlive(pid: number | null | undefined): boolean {
  return !!pid && pidAlive(pid);
}
