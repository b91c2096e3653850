/**
 * The lab's cluster: two hosts (source S, destination D) on one
 * machine, linked by a veth pair, each running its own tether daemon with its
 * own state dir, real QEMU (TCG) and the memcheck guest. Everything it creates
 * is removed in teardown, also when the test fails or is interrupted.
 *
 * With `guestNet` the guest also gets a NIC and runs netcheck, and a third namespace,
 * the client, joins: each host has a bridge (GUEST_BRIDGE) holding the VM's TAP and
 * an uplink veth whose other end is a port of the switch bridge in the client
 * namespace (SWITCH_PORT_S / SWITCH_PORT_D). The guest segment shares nothing with
 * the migration link, so cutting that link leaves the guest reachable.
 *
 *      client ns                 host-s ns                      host-d ns
 *   [sw 10.99.0.1]--ups ~~ upl--[brg]--tap0 (VM)   ...   [brg]--tap0 (VM)
 *        \------upd ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ upl--/
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { callDaemon } from '../src/control/client.ts';
import type { TetherError } from '../src/errors.ts';
import { HOLD_COMPLETION_RELEASE } from '../src/migrate/faults.ts';
import { hostYaml, vmYaml } from './cluster-config.ts';
import { spawnNetclient, type NetClient, type NetclientOptions } from './net/driver.ts';
import { sh, sweepStale, waitExit, waitFor } from './proc.ts';
import {
  CLIENT_IP,
  GUEST_BRIDGE,
  GUEST_MAC,
  GUEST_TAP,
  ROOT,
  SWITCH_BRIDGE,
  SWITCH_PORT_D,
  SWITCH_PORT_S,
  TETHER,
  type ClusterOptions,
  type Host,
  type RunResult,
} from './topology.ts';
import { WireCapture } from './wire/wirecap.ts';

let counter = 0;
const live = new Set<Cluster>();

export class Cluster {
  readonly id: string;
  readonly dir: string;
  readonly src: Host;
  readonly dst: Host;
  readonly vmConfig: string;
  /** The VM's raw disk image (when opts.disk). */
  readonly diskImage: string;
  readonly vmName = 'vm1';
  /** The client namespace (guestNet only). */
  readonly clientNs: string;
  readonly clients = new Set<NetClient>();
  readonly captures = new Set<WireCapture>();
  #cleaned = false;
  /** TETHER_FAULTS per host set by restartDaemon (else opts.faults). */
  readonly #faults = new Map<Host, string | undefined>();
  /** Processes of resolveSender not yet done. */
  readonly #senders = new Set<ChildProcess>();

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
      vmConfigDir: path.join(this.dir, `vms-${suffix}`),
      daemonLog: path.join(this.dir, `daemon-${suffix}.log`),
    });
    const net3 = 10 + (n % 240);
    this.src = mk('source', 's', `10.77.${net3}.1`);
    this.dst = mk('destination', 'd', `10.77.${net3}.2`);
    this.vmConfig = path.join(this.src.vmConfigDir, 'vm1.yaml');
    this.clientNs = `${this.id}c`;
    this.diskImage = path.join(this.dir, 'shared', 'vm1.img');
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
    if (this.opts.guestNet) this.#guestSegment();
    for (const h of [src, dst]) {
      const keyFile = path.join(this.dir, this.opts.mismatchedKeys ? `peer-${h.role}.key` : 'peer.key');
      if (!fs.existsSync(keyFile)) fs.writeFileSync(keyFile, randomBytes(32).toString('base64') + '\n', { mode: 0o600 });
      fs.writeFileSync(h.config, hostYaml(h, keyFile));
    }
    this.writeVmConfig([src, dst], vmYaml(this.opts, this.vmName, this.diskImage));
    for (const h of [src, dst]) this.#startDaemon(h);
    await Promise.all([src, dst].map((h) => waitForSocket(h)));
  }

  /** Write the VM's YAML into each host's vmConfigDir (both hosts hold the same file by default). */
  writeVmConfig(hosts: Host[], text: string): void {
    for (const h of hosts) {
      fs.mkdirSync(h.vmConfigDir, { recursive: true });
      fs.writeFileSync(path.join(h.vmConfigDir, `${this.vmName}.yaml`), text);
    }
  }

  /**
   * The guest segment (see the file comment). Namespaces own every device created
   * here, so deleting the three namespaces removes all of it.
   */
  #guestSegment(): void {
    const c = this.clientNs;
    sh('ip', ['netns', 'add', c]);
    sh('ip', ['-n', c, 'link', 'set', 'lo', 'up']);
    sh('ip', ['-n', c, 'link', 'add', SWITCH_BRIDGE, 'type', 'bridge']);
    sh('ip', ['-n', c, 'addr', 'add', `${CLIENT_IP}/24`, 'dev', SWITCH_BRIDGE]);
    sh('ip', ['-n', c, 'link', 'set', SWITCH_BRIDGE, 'up']);
    for (const [h, port] of [
      [this.src, SWITCH_PORT_S],
      [this.dst, SWITCH_PORT_D],
    ] as const) {
      sh('ip', ['-n', h.ns, 'link', 'add', GUEST_BRIDGE, 'type', 'bridge']);
      sh('ip', ['-n', h.ns, 'link', 'set', GUEST_BRIDGE, 'up']);
      sh('ip', ['-n', h.ns, 'link', 'add', 'upl', 'type', 'veth', 'peer', 'name', port, 'netns', c]);
      sh('ip', ['-n', h.ns, 'link', 'set', 'upl', 'master', GUEST_BRIDGE, 'up']);
      sh('ip', ['-n', c, 'link', 'set', port, 'master', SWITCH_BRIDGE, 'up']);
      if (this.opts.guestNet === 'qemu-tap') {
        // QEMU attaches to this TAP by name; the gate creates its own.
        sh('ip', ['-n', h.ns, 'tuntap', 'add', 'dev', GUEST_TAP, 'mode', 'tap']);
        sh('ip', ['-n', h.ns, 'link', 'set', GUEST_TAP, 'master', GUEST_BRIDGE, 'up']);
      }
    }
  }

  /** Start a verifying netcheck client in the client namespace. */
  netclient(opts: NetclientOptions = {}): NetClient {
    const client = spawnNetclient(this.clientNs, path.join(this.dir, `netclient-${this.clients.size}.jsonl`), opts);
    this.clients.add(client);
    return client;
  }

  /**
   * Capture the frames of the VM's MAC that arrive at the switch from each host's uplink
   * (lab/wire/wirecap.ts); stopped by cleanup.
   */
  async capture(): Promise<WireCapture> {
    const w = await WireCapture.start(this.clientNs, this.dir, GUEST_MAC, [SWITCH_PORT_S, SWITCH_PORT_D]);
    this.captures.add(w);
    return w;
  }

  /** Run a command in the client namespace. */
  inClient(cmd: string, args: string[], opts: { allowFail?: boolean } = {}): string {
    return sh('ip', ['netns', 'exec', this.clientNs, cmd, ...args], opts);
  }

  /** SIGKILL one host's sidecar only (its QEMU processes keep running). */
  async killDaemon(h: Host): Promise<void> {
    const d = h.daemon;
    if (!d?.pid || d.exitCode !== null) return;
    const gone = waitExit(d, 10_000);
    process.kill(d.pid, 'SIGKILL');
    await gone;
  }

  /** SIGTERM one host's sidecar (a graceful stop, as `systemctl stop` does) and wait for it to exit. */
  async termDaemon(h: Host): Promise<number | null> {
    const d = h.daemon;
    if (!d?.pid || d.exitCode !== null) return d?.exitCode ?? null;
    const gone = waitExit(d, 60_000);
    process.kill(d.pid, 'SIGTERM');
    await gone;
    return d.exitCode;
  }

  /**
   * Start a host's sidecar again (after killDaemon/termDaemon) and wait for its control
   * socket. `faults` replaces the host's TETHER_FAULTS from now on (undefined: none), so
   * one cluster can run scenarios that need different faults.
   */
  async restartDaemon(h: Host, opts: { faults?: string } = {}): Promise<void> {
    if ('faults' in opts) this.#faults.set(h, opts.faults);
    this.#startDaemon(h);
    await waitForSocket(h);
  }

  /**
   * Give a host's sidecar a key of its own (`own`: one no other host has, an impostor)
   * or the other host's key; takes effect at its next (re)start.
   */
  setPeerKey(h: Host, own: boolean): void {
    const keyFile = (x: Host) => /^ {2}keyFile: (.*)$/m.exec(fs.readFileSync(x.config, 'utf8'))![1]!;
    let file = keyFile(h === this.src ? this.dst : this.src);
    if (own) {
      file = path.join(this.dir, `peer-${h.role}-own.key`);
      fs.writeFileSync(file, randomBytes(32).toString('base64') + '\n', { mode: 0o600 });
    }
    fs.writeFileSync(h.config, fs.readFileSync(h.config, 'utf8').replace(/^ {2}keyFile: .*$/m, `  keyFile: ${file}`));
  }

  #startDaemon(h: Host): void {
    const log = fs.openSync(h.daemonLog, 'a');
    let faults = this.#faults.has(h) ? this.#faults.get(h) : h.role === 'source' ? this.opts.faults?.source : this.opts.faults?.destination;
    if (this.opts.holdCompletion && h.role === 'destination') faults = faults ? `${faults},hold-completion` : 'hold-completion';
    h.daemon = spawn('ip', ['netns', 'exec', h.ns, process.execPath, TETHER, 'daemon', '--config', h.config], {
      stdio: ['ignore', log, log],
      detached: true,
      env: { ...process.env, ...this.opts.env, ...(faults ? { TETHER_FAULTS: faults } : {}) },
    });
    fs.closeSync(log);
  }

  /**
   * With opts.holdCompletion: let the destination ask to complete once QEMU's stream is
   * done (from its next checkpoint on, for this and every later migration).
   */
  releaseCompletion(): void {
    const dir = path.join(this.dst.stateDir, this.vmName);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, HOLD_COMPLETION_RELEASE), '');
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

  /**
   * A source's answer (RESOLVE) from inside host `from`'s namespace to `to`'s peer port, sent
   * by notifyDestination (the production sender): e.g. a stale retry of an earlier migration.
   * The process starts now (tsx takes about a second to load) and sends only when send() is
   * called, which resolves with notifyDestination's outcome. Stopped by cleanup() if unsent.
   */
  resolveSender(from: Host, to: Host, body: Record<string, unknown>): { send(): Promise<string> } {
    const args = ['netns', 'exec', from.ns, process.execPath, '--import', 'tsx', path.join(ROOT, 'lab', 'send-resolve.ts')];
    const p = spawn('ip', [...args, from.config, `${to.addr}:7700`, JSON.stringify(body)], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
    this.#senders.add(p);
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    const exited = new Promise<number | null>((r) => p.on('close', r));
    return {
      send: async () => {
        await waitFor(() => out.startsWith('ready\n') || p.exitCode !== null, 'resolve sender loaded', 60_000);
        p.stdin.end('go\n');
        const code = await exited;
        this.#senders.delete(p);
        if (code !== 0) throw new Error(`send-resolve exited ${code}: ${err.slice(-1500)}`);
        return out.trim().split('\n').pop() ?? '';
      },
    };
  }

  /** Scrape a host's Prometheus endpoint from inside its namespace (read a sample with metricValue). */
  metrics(h: Host): string {
    const js = `fetch('http://${h.addr}:9700/metrics').then((r) => r.text()).then((t) => process.stdout.write(t))`;
    return sh('ip', ['netns', 'exec', h.ns, process.execPath, '-e', js]);
  }

  /**
   * The VM's status from a host's daemon: the control request `tether status <vm> --json`
   * makes, sent from this process. Tests poll it often; a CLI process per poll costs about
   * a second of tsx start-up on the 2-core CI machine.
   */
  async status(h: Host): Promise<Record<string, any>> {
    try {
      return (await callDaemon(h.socket, 'status', { vm: this.vmName })) as Record<string, any>;
    } catch (e) {
      const err = e as TetherError;
      return { state: 'absent', error: `${err.code ?? 'ERR_INTERNAL'}: ${err.message}` };
    }
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

  /** Remove nftDrop()'s rules: the hosts reach each other again. */
  nftClear(): void {
    sh('ip', ['netns', 'exec', this.src.ns, 'nft', 'delete', 'table', 'inet', 'tether_fault']);
  }

  async cleanup(): Promise<void> {
    if (this.#cleaned) return;
    this.#cleaned = true;
    for (const p of this.#senders) p.kill('SIGKILL'); // our own child (ip netns exec execs node)
    await Promise.all([...this.clients].map((cl) => cl.stop()));
    await Promise.all([...this.captures].map((w) => w.stop()));
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
    for (const cl of this.clients) cl.kill();
    for (const w of this.captures) w.kill();
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
    if (this.opts.guestNet) sh('ip', ['netns', 'del', this.clientNs], { allowFail: true });
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

/** Until the sidecar serves its control socket and has recovered every VM it found (none `recovering`). */
async function waitForSocket(h: Host): Promise<void> {
  await waitFor(
    async () => {
      try {
        const st = (await callDaemon(h.socket, 'status', {})) as { vms: { state: string }[] };
        return st.vms.every((v) => v.state !== 'recovering');
      } catch {
        return false;
      }
    },
    `daemon ${h.name} control socket and recovery (log: ${h.daemonLog})`,
    30_000,
  );
}

/**
 * Wait until the source has applied (and acked) checkpoint `epoch` of the
 * migration `migrating`; fails if that migration ends first.
 */
export async function waitApplied(c: Cluster, epoch: number, migrating: Promise<unknown>): Promise<void> {
  let ended = false;
  void migrating.finally(() => (ended = true));
  await waitFor(async () => {
    if (ended) throw new Error(`the migration ended before checkpoint ${epoch} was applied: ${JSON.stringify(await migrating)}`);
    const s = await c.status(c.src);
    return (s.migration?.appliedEpoch ?? -1) >= epoch;
  }, `checkpoint ${epoch} applied on the source`);
}

/**
 * The value of metric `name`'s sample whose labels include every one of `labels`, from
 * Prometheus text (Cluster.metrics; labels come sorted by name), or NaN when there is none.
 */
export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number {
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = new Map([...(m[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1]!, x[2]!]));
    if (Object.entries(labels).every(([k, v]) => have.get(k) === v)) return Number(m[3]);
  }
  return NaN;
}
