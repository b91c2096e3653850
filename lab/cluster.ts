/**
 * Network-namespace harness: two hosts (source S, destination D) on one
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
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { callDaemon } from '../src/control/client.ts';
import type { TetherError } from '../src/errors.ts';
import { HOLD_COMPLETION_RELEASE } from '../src/migrate/faults.ts';
import { WireCapture } from './wire/wirecap.ts';

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
  /** This host's VM configs (<vmConfigDir>/vm1.yaml): a destination runs QEMU from its own. */
  vmConfigDir: string;
  daemonLog: string;
  daemon?: ChildProcess;
}

/** The guest segment: fixed, every cluster's segment lives in its own namespaces. */
export const GUEST_IP = '10.99.0.10';
export const CLIENT_IP = '10.99.0.1';
export const GUEST_MAC = '52:54:00:12:34:56';
export const NETCHECK_PORT = 7000;
export const GUEST_BRIDGE = 'brg';
export const GUEST_TAP = 'tap0';
export const SWITCH_BRIDGE = 'sw';
export const SWITCH_PORT_S = 'ups';
export const SWITCH_PORT_D = 'upd';

export interface ClusterOptions {
  /**
   * Give the guest a NIC on the guest segment and start netcheck in it.
   *   qemu-tap: QEMU's own `-netdev tap` on a TAP the harness creates (no gate: the
   *             baseline, and a NIC whose output nobody holds back);
   *   gate:     the VM config's `nics`, served by the sidecar's gate.
   */
  guestNet?: 'qemu-tap' | 'gate';
  /**
   * With guestNet 'qemu-tap': QEMU's vnet_hdr on the TAP (default on, QEMU's own default).
   * Off, the guest gets no checksum/segmentation offloads, as behind the gate's stream
   * netdev, which carries no virtio-net header (the network benchmark's like-for-like baseline).
   */
  tapVnetHdr?: boolean;
  /** Bound of the gate's held frames (VM config `gate`), with guestNet 'gate'. */
  gate?: { maxBytes?: number; maxFrames?: number };
  /** TETHER_FAULTS for each daemon. */
  faults?: { source?: string; destination?: string };
  /**
   * The destination's sidecar runs with the fault hold-completion (src/migrate/faults.ts),
   * on every start, whatever else its TETHER_FAULTS say: a migration cannot end before
   * the test interrupts it, however fast the machine, until releaseCompletion().
   */
  holdCompletion?: boolean;
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
    /** Appended to the guest kernel command line (e.g. "tether.ip=10.99.0.2/24"). */
    appendExtra?: string;
    /** YAML lines appended to the VM config (e.g. a nics: block). */
    extraYaml?: string[];
    hotStandby?: boolean;
    memoryMiB?: number;
  };
  /** Extra environment for both daemons. */
  env?: Record<string, string>;
  /**
   * Boot this guest instead of the busybox one: its kernel, initrd and whole kernel command
   * line (the Debian guest of netns-tests/apps/, with disk.guest 'os'). With guestNet,
   * `tether.ip=GUEST_IP/24` is appended (no netcheck).
   */
  boot?: { kernel: string; initrd: string; append: string };
  /**
   * Opt-in: give the VM a raw disk image in the cluster directory (which both
   * namespaces see: the shared storage of the disk's storage model) and run a disk
   * program in the guest instead of memcheck.
   */
  disk?: {
    /**
     * diskcheck: zeroed image, `diskcheck /dev/vda <blocks> <writesPerPass> <delayMs>`; fsload: ext4 image;
     * diskbench (benchmarks): zeroed image, `diskbench /dev/vda <benchSpanMiB> <benchOps>`.
     */
    guest: 'diskcheck' | 'fsload' | 'diskbench' | 'os';
    /**
     * diskcheck: every Nth write of a pass becomes a BLKZEROOUT or BLKDISCARD of 1..4 blocks
     * (alternately), which must then read as zeroes (zero extents in the journal, DISKZERO).
     */
    zeroEvery?: number;
    /** With guest 'os': the image the VM boots from (root=/dev/vda), copied (sparse) as its disk. */
    image?: string;
    benchSpanMiB?: number;
    benchOps?: number;
    /** diskbench waits for triggerDiskbench() before its run (the image must exceed the span). */
    benchTrigger?: boolean;
    /**
     * Benchmark baseline: plain QEMU on the raw image (a file blockdev, cache.direct=on, under
     * the same virtio-blk-pci, via qemu.extraArgs) instead of tether's disk section; the VM
     * config then has no disk section. Not with guestNet 'qemu-tap'.
     */
    direct?: boolean;
    mib?: number;
    blocks?: number;
    writesPerPass?: number;
    delayMs?: number;
    journalMaxBytes?: number;
  };
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * TETHER_TEST_FAST=1: make every scenario's machine effectively faster, to show that no
 * scenario depends on the machine being slow: the migration link unshaped (maxBandwidth 0)
 * and a 256 MiB guest, unless the test sets them itself.
 */
const FAST = process.env.TETHER_TEST_FAST === '1';

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
      fs.writeFileSync(
        h.config,
        [
          `name: ${h.name}`,
          `stateDir: ${h.stateDir}`,
          `ramDir: ${h.ramDir}`,
          `controlSocket: ${h.socket}`,
          `vmConfigDir: ${h.vmConfigDir}`,
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
    const disk = this.opts.disk;
    let run = `memcheck:${v.memcheckMiB ?? 96}:${v.memcheckMBps ?? 32}`;
    const diskYaml: string[] = [];
    if (disk) {
      fs.mkdirSync(path.dirname(this.diskImage), { recursive: true });
      if (disk.guest === 'os') {
        if (!disk.image) throw new Error("disk.guest 'os' needs disk.image");
        sh('cp', ['--sparse=always', disk.image, this.diskImage]);
      } else {
        fs.writeFileSync(this.diskImage, '');
        fs.truncateSync(this.diskImage, (disk.mib ?? 16) * 1024 * 1024);
      }
      if (disk.guest === 'os') {
        // the guest runs what its own image starts
      } else if (disk.guest === 'fsload') {
        sh('mkfs.ext4', ['-q', '-F', '-b', '4096', this.diskImage]);
        run = 'fsload:/dev/vda:8:64';
      } else if (disk.guest === 'diskbench') {
        run = `diskbench:/dev/vda:${disk.benchSpanMiB ?? 64}:${disk.benchOps ?? 2000}${disk.benchTrigger ? ':trigger' : ''}`;
      } else {
        // Dense writes, quick verification: most of the guest's time is spent writing, so
        // every epoch (the one a rollback discards included) holds writes.
        run = `diskcheck:/dev/vda:${disk.blocks ?? 512}:${disk.writesPerPass ?? 64}:${disk.delayMs ?? 1}${disk.zeroEvery ? `:${disk.zeroEvery}` : ''}`;
      }
      if (!disk.direct) {
        diskYaml.push('disk:', `  image: ${this.diskImage}`, `  journalMaxBytes: ${disk.journalMaxBytes ?? 64 * 1024 * 1024}`);
      }
    }
    const boot = this.opts.boot;
    const net = this.opts.guestNet ? ` tether.ip=${GUEST_IP}/24${boot ? '' : ` tether.netcheck=${NETCHECK_PORT}`}` : '';
    const nic: string[] = [];
    if (disk?.direct) {
      if (this.opts.guestNet === 'qemu-tap') throw new Error('disk.direct and guestNet qemu-tap both need qemu.extraArgs');
      nic.push(
        'qemu:',
        '  extraArgs:',
        '    - "-blockdev"',
        `    - "driver=file,node-name=disk0,filename=${this.diskImage},cache.direct=on,discard=unmap"`,
        '    - "-device"',
        '    - "virtio-blk-pci,drive=disk0,id=vda"',
      );
    }
    if (this.opts.guestNet === 'qemu-tap') {
      nic.push(
        'qemu:',
        '  extraArgs:',
        '    - "-netdev"',
        `    - "tap,id=net0,ifname=${GUEST_TAP},script=no,downscript=no${this.opts.tapVnetHdr === false ? ',vnet_hdr=off' : ''}"`,
        '    - "-device"',
        `    - "virtio-net-pci,netdev=net0,mac=${GUEST_MAC}"`,
      );
    } else if (this.opts.guestNet === 'gate') {
      nic.push('nics:', `  - mac: "${GUEST_MAC}"`, `    bridge: ${GUEST_BRIDGE}`, `    tap: ${GUEST_TAP}`);
      const g = this.opts.gate ?? {};
      if (g.maxBytes !== undefined || g.maxFrames !== undefined) {
        nic.push('gate:');
        if (g.maxBytes !== undefined) nic.push(`  maxBytes: ${g.maxBytes}`);
        if (g.maxFrames !== undefined) nic.push(`  maxFrames: ${g.maxFrames}`);
      }
    }
    this.writeVmConfig(
      [src, dst],
      [
        `name: ${this.vmName}`,
        `memoryMiB: ${v.memoryMiB ?? (FAST ? 256 : 512)}`,
        `kernel: ${boot?.kernel ?? path.join(GUEST, 'vmlinuz')}`,
        `initrd: ${boot?.initrd ?? path.join(GUEST, 'initrd.img')}`,
        `append: "${boot?.append ?? `console=ttyS0 quiet panic=-1 tether.run=${run}`}${net}${v.appendExtra ? ` ${v.appendExtra}` : ''}"`,
        ...nic,
        `checkpoint:`,
        `  intervalMs: ${v.intervalMs ?? 50}`,
        `  failoverTimeoutMs: ${v.failoverTimeoutMs ?? 8000}`,
        `  fenceTimeoutMs: ${v.fenceTimeoutMs ?? 4000}`,
        `migration:`,
        `  maxBandwidth: ${v.maxBandwidth ?? (FAST ? 0 : 16 * 1024 * 1024)}`,
        `  hotStandby: ${v.hotStandby ?? true}`,
        ...(v.extraYaml ?? []),
        ...diskYaml,
        '',
      ].join('\n'),
    );
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
  netclient(opts: { intervalMs?: number; stallMs?: number; udpPort?: number } = {}): NetClient {
    const args = [
      'netns',
      'exec',
      this.clientNs,
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
    const client = new NetClient(p, path.join(this.dir, `netclient-${this.clients.size}.jsonl`));
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

  /** Scrape a host's Prometheus endpoint from inside its namespace. */
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

/**
 * Remove what an earlier run left behind when it was killed too hard to clean
 * up (SIGKILL): namespaces, QEMU processes and RAM files named after a test
 * process that no longer exists.
 */
export function sweepStale(): void {
  const owners = new Set<string>();
  for (const line of sh('ip', ['netns', 'list'], { allowFail: true }).split('\n')) {
    const m = /^(tt(\d+)x\d+)[sdc]\b/.exec(line);
    if (m && !pidAlive(Number(m[2]))) owners.add(m[1]!);
  }
  for (const f of fs.readdirSync('/dev/shm')) {
    const m = /^tether-(tt(\d+)x\d+)$/.exec(f);
    if (m && !pidAlive(Number(m[2]))) owners.add(m[1]!);
  }
  for (const id of owners) {
    sh('pkill', ['-9', '-f', `tether-${id}-.*/[sd]\\.yaml`], { allowFail: true }); // daemons
    sh('pkill', ['-9', '-f', `qemu-system.*tether-${id}[-/]`], { allowFail: true });
    // netclients run in the client namespace (ns "<id>c"); its devices go with it
    for (const pid of sh('ip', ['netns', 'pids', `${id}c`], { allowFail: true })
      .split(/\s+/)
      .filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    for (const suffix of ['s', 'd', 'c']) sh('ip', ['netns', 'del', `${id}${suffix}`], { allowFail: true });
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

export interface DiskcheckReport {
  /** Pass numbers reported ok, in log order. */
  passes: number[];
  /** MISMATCH lines and diskcheck's own error lines. */
  mismatch: string[];
}

/** Parse diskcheck's lines from a serial log (from byte `from` on). */
export function diskcheck(serialLog: string, from = 0): DiskcheckReport {
  let text = '';
  try {
    text = fs.readFileSync(serialLog).subarray(from).toString('latin1');
  } catch {
    /* not there yet */
  }
  const passes: number[] = [];
  const mismatch: string[] = [];
  for (const line of text.split(/\r?\n/)) {
    const ok = /diskcheck pass (\d+) ok/.exec(line);
    if (ok) passes.push(Number(ok[1]));
    if (/MISMATCH|diskcheck: /.test(line)) mismatch.push(line);
  }
  return { passes, mismatch };
}

export interface DiskbenchCase {
  case: string;
  qd: number;
  ops: number;
  us: number;
  iops: number;
  latMeanUs: number;
  latP50Us: number;
  latP99Us: number;
}

/** diskbench's result lines from a serial log; `done` once it finished, `error` on its error line. */
export function diskbench(serialLog: string): { cases: DiskbenchCase[]; done: boolean; error?: string } {
  let text = '';
  try {
    text = fs.readFileSync(serialLog, 'utf8');
  } catch {
    /* not created yet */
  }
  const cases: DiskbenchCase[] = [];
  let error: string | undefined;
  for (const line of text.split('\n')) {
    const m = /diskbench case=(\S+) qd=(\d+) ops=(\d+) us=(\d+) iops=(\d+) lat_mean_us=(\d+) lat_p50_us=(\d+) lat_p99_us=(\d+)/.exec(line);
    if (m) {
      const n = m.slice(2).map(Number) as [number, number, number, number, number, number, number];
      cases.push({ case: m[1]!, qd: n[0], ops: n[1], us: n[2], iops: n[3], latMeanUs: n[4], latP50Us: n[5], latP99Us: n[6] });
    }
    if (/diskbench: /.test(line)) error ??= line.trim();
  }
  return { cases, done: /diskbench done/.test(text), ...(error ? { error } : {}) };
}

/** What diskbench's trigger block begins with (TRIGGER_MAGIC in tools/guest/diskbench.c). */
export const DISKBENCH_TRIGGER = 'tether-diskbench-go';

/**
 * Start a diskbench that waits for its trigger (disk.benchTrigger): write the magic into
 * the image's last 4 KiB block, which the guest polls with O_DIRECT reads. The block lies
 * outside the benchmark's span and nobody else writes it.
 */
export function triggerDiskbench(image: string): void {
  const size = fs.statSync(image).size;
  const fd = fs.openSync(image, 'r+');
  try {
    fs.writeSync(fd, Buffer.from(DISKBENCH_TRIGGER), 0, DISKBENCH_TRIGGER.length, size - 4096);
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Wait for `count` more diskcheck passes after byte `from` (or a mismatch). */
export async function waitDiskPasses(serialLog: string, from: number, count: number, what: string): Promise<DiskcheckReport> {
  let rep = diskcheck(serialLog, from);
  await waitFor(() => {
    rep = diskcheck(serialLog, from);
    return rep.passes.length >= count || rep.mismatch.length > 0;
  }, `${count} diskcheck passes ${what} (${serialLog})`);
  return rep;
}

/** Wait for `count` more completed fsload rounds after byte `from`. */
export async function waitFsRounds(serialLog: string, from: number, count: number, what: string): Promise<void> {
  await waitFor(() => {
    let text = '';
    try {
      text = fs.readFileSync(serialLog).subarray(from).toString('latin1');
    } catch {
      /* not there yet */
    }
    if (/fsload: /.test(text)) throw new Error(`fsload failed ${what}: ${text.slice(-500)}`);
    return (text.match(/fsload round \d+ ok/g) ?? []).length >= count;
  }, `${count} fsload rounds ${what} (${serialLog})`);
}

/**
 * `e2fsck -fn` as after a crash: the guest stopped without unmounting, so its ext4
 * journal is replayed first (on a copy; the image itself is left as the VM left it).
 * Returns e2fsck's exit code and output.
 */
export function e2fsck(image: string): { code: number; output: string } {
  const copy = `${image}.fsck`;
  fs.copyFileSync(image, copy);
  try {
    spawnSync('e2fsck', ['-E', 'journal_only', '-p', copy], { encoding: 'utf8' });
    const r = spawnSync('e2fsck', ['-fn', copy], { encoding: 'utf8' });
    return { code: r.status ?? -1, output: `${r.stdout}${r.stderr}` };
  } finally {
    fs.rmSync(copy, { force: true });
  }
}

/** Packets the kernel's per-CPU input backlogs dropped (second column of /proc/net/softnet_stat, all CPUs). */
export function softnetDropped(): number {
  return fs
    .readFileSync('/proc/net/softnet_stat', 'utf8')
    .trim()
    .split('\n')
    .reduce((sum, l) => sum + parseInt(l.trim().split(/\s+/)[1] ?? '0', 16), 0);
}
