import { readdirSync, readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { loadVmConfig, parseVmConfig } from '../config/load.ts';
import type { HostConfig } from '../config/types.ts';
import { encodeLine, LineDecoder, parseRequest } from '../control/codec.ts';
import type { ControlRequest } from '../control/codec.ts';
import { CheckpointStore } from '../checkpoint/store.ts';
import { isTetherError, TetherError } from '../errors.ts';
import { DestinationMigration } from '../migrate/destination.ts';
import { parseFaults } from '../migrate/faults.ts';
import type { Faults } from '../migrate/faults.ts';
import { SourceMigration, waitRunning } from '../migrate/source.ts';
import { settleStandbys } from '../migrate/standby.ts';
import { asPeerControl } from '../migrate/control-messages.ts';
import { TetherMetrics } from '../metrics/registry.ts';
import { qemuOptValue } from '../qemu/cmdline.ts';
import { PeerChannel } from '../peer/channel.ts';
import http from 'node:http';
import type { Logger } from '../util/log.ts';
import { errorFields } from '../util/log.ts';
import { VmInstance } from '../vm/instance.ts';

type Progress = (p: Record<string, unknown>) => void;

/**
 * The sidecar for one host: supervises this host's VMs, serves the CLI on a
 * unix socket and accepts incoming migrations from peers.
 */
export class Daemon {
  readonly host: HostConfig;
  readonly log: Logger;
  readonly #faults: Faults;
  readonly vms = new Map<string, VmInstance>();
  readonly #outgoing = new Map<string, SourceMigration>();
  readonly #incoming = new Map<string, DestinationMigration>();
  #control: net.Server | undefined;
  #peer: net.Server | undefined;
  #http: http.Server | undefined;
  readonly metrics = new TetherMetrics((set) => {
    const counts = new Map<string, number>();
    for (const vm of this.vms.values()) counts.set(vm.place, (counts.get(vm.place) ?? 0) + 1);
    for (const [state, n] of counts) set({ state }, n);
  });

  constructor(host: HostConfig, log: Logger, faults: Faults = parseFaults(process.env.TETHER_FAULTS)) {
    this.host = host;
    this.log = log;
    this.#faults = faults;
  }

  async start(): Promise<void> {
    await fs.mkdir(this.host.stateDir, { recursive: true, mode: 0o700 });
    await fs.mkdir(this.host.ramDir, { recursive: true, mode: 0o700 });
    await fs.mkdir(path.dirname(this.host.controlSocket), { recursive: true });
    await fs.rm(this.host.controlSocket, { force: true });
    await this.#recover();
    this.#control = net.createServer((s) => this.#serveControl(s));
    await listen(this.#control, { path: this.host.controlSocket });
    await fs.chmod(this.host.controlSocket, 0o600);
    this.#peer = net.createServer((s) => void this.#servePeer(s));
    await listen(this.#peer, { host: this.host.peer.listen.host, port: this.host.peer.listen.port });
    if (this.host.metrics) {
      const srv = http.createServer((req, res) => {
        if (req.method === 'GET' && req.url === '/metrics') {
          res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(this.metrics.registry.render());
        } else res.writeHead(404).end();
      });
      await listen(srv as unknown as net.Server, { host: this.host.metrics.host, port: this.host.metrics.port });
      this.#http = srv;
    }
    this.log.info('daemon ready', {
      control: this.host.controlSocket,
      peer: `${this.host.peer.listen.host}:${this.host.peer.listen.port}`,
      faults: Object.keys(this.#faults).length ? this.#faults : undefined,
    });
  }

  /**
   * After a sidecar restart: find this host's VMs again. A running QEMU is
   * adopted (the guest does not notice). A migration that was in progress is
   * resolved the only safe way: as a source past switchover, re-apply a
   * persisted stage and resume from the last applied checkpoint (the old QEMU
   * is wedged in post-copy); as a source before switchover, cancel and keep the
   * VM; as a destination, fence (the source rolls back on its own).
   */
  async #recover(): Promise<void> {
    let names: string[];
    try {
      names = await fs.readdir(this.host.stateDir);
    } catch {
      return;
    }
    for (const name of names) {
      const dir = path.join(this.host.stateDir, name);
      const saved = await VmInstance.readPersisted(dir);
      if (!saved) continue;
      const log = this.log.child({ vm: name, recovery: true });
      try {
        const cfg = parseVmConfig(saved.vm.config as unknown as Record<string, unknown>, { baseDir: '/' });
        const vm = new VmInstance(this.host, cfg, this.log);
        vm.sendConfiguration = saved.vm.sendConfiguration;
        this.vms.set(vm.name, vm);
        // Every QEMU on this VM's RAM file (the one vm.json names first), so that
        // none is missed even if the sidecar died between spawning one and recording it.
        // A hot standby that never got device state is not a VM's QEMU: killed first.
        const pids = await settleStandbys(vm, qemuPidsFor(vm.ramFile), saved.vm.pid, log);
        const all = pids.sort((a, b) => (a === saved.vm.pid ? -1 : b === saved.vm.pid ? 1 : 0));
        const marker = saved.marker;
        if (marker?.role === 'destination') {
          for (const p of all) await killPid(p);
          await vm.removeRam();
          vm.place = 'fenced';
          log.warn('incoming migration interrupted by a sidecar restart: fenced');
        } else if (marker?.role === 'source') {
          // A QEMU other than the one that was migrating was started by a rollback
          // that finished: it runs the VM now, so it is adopted, never restored over.
          const newer = all.filter((p) => p !== marker.qemuPid);
          if (newer.length > 0) {
            for (const p of all) if (p !== newer[0]) await killPid(p);
            await vm.adopt(newer[0]!);
            vm.place = 'running';
            log.warn('sidecar restarted after a rollback had finished: adopted the restored QEMU', { pid: newer[0] });
          } else {
            await this.#recoverSource(vm, all[0] ?? null, log);
          }
        } else if (all.length > 0) {
          for (const p of all.slice(1)) await killPid(p);
          await vm.adopt(all[0]!);
          vm.place = 'running';
        } else {
          vm.place = 'stopped';
          log.warn('VM was not running when the sidecar restarted');
        }
        await vm.setMigrationMarker(null);
      } catch (e) {
        log.error('recovery failed', { error: errorFields(e) });
      }
    }
  }

  async #recoverSource(vm: VmInstance, pid: number | null, log: Logger): Promise<void> {
    const store = new CheckpointStore({ dir: vm.checkpointDir, ramPath: vm.ramFile, ramBytes: vm.ramBytes });
    let last: { epoch: number; devstatePath: string } | null = null;
    try {
      const rep = await store.recover();
      last = store.lastApplied();
      log.info('checkpoint store recovered', { report: rep as unknown as Record<string, unknown>, epoch: last.epoch });
    } catch (e) {
      if (!isTetherError(e, 'ERR_CKPT_NOT_INITIALIZED')) throw e;
    }
    if (last === null) {
      // Before switchover: the old QEMU still owns the VM.
      if (!pid) throw new TetherError('ERR_RECOVERY', 'no checkpoint and no QEMU: the VM is lost');
      await vm.adopt(pid);
      const q = vm.qemu!.qmp;
      await q.execute('migrate_cancel').catch(() => {});
      for (let i = 0; i < 250; i++) {
        const m = (await q.execute('query-migrate')) as { status?: string };
        if (!['active', 'setup', 'cancelling', 'pre-switchover', 'device'].includes(m.status ?? '')) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      const st = (await q.execute('query-status')) as { status: string };
      if (st.status !== 'running') await q.execute('cont');
      vm.place = 'running';
      vm.lastMigration = { outcome: 'rolled-back', reason: 'sidecar-restart', rollback: { epoch: null } };
      log.warn('migration interrupted before switchover by a sidecar restart: cancelled, VM kept');
      return;
    }
    if (pid) await killPid(pid);
    await vm.restoreFrom(last.devstatePath);
    await waitRunning(vm);
    await vm.qemu!.qmp.execute('announce-self', { initial: 50, max: 550, rounds: 5, step: 100 });
    vm.place = 'running';
    vm.lastMigration = { outcome: 'rolled-back', reason: 'sidecar-restart', rollback: { epoch: last.epoch } };
    this.metrics.rollbacks.inc({ reason: 'sidecar-restart' });
    log.warn('migration interrupted by a sidecar restart: resumed from the last applied checkpoint', { epoch: last.epoch });
  }

  /** Stop serving and stop every QEMU this daemon runs. */
  async shutdown(): Promise<void> {
    this.#control?.close();
    this.#peer?.close();
    this.#http?.close();
    for (const d of this.#incoming.values()) await d.fence('daemon-shutdown').catch(() => {});
    for (const vm of this.vms.values()) {
      vm.place = 'stopped';
      await vm.stopQemu().catch(() => {});
    }
    await fs.rm(this.host.controlSocket, { force: true });
  }

  // ---- control socket (CLI) ----

  #serveControl(sock: net.Socket): void {
    const dec = new LineDecoder();
    sock.on('error', () => {});
    sock.on('data', (chunk) => {
      let msgs: unknown[];
      try {
        msgs = dec.push(chunk);
      } catch (e) {
        sock.end(encodeLine({ id: 0, error: { code: (e as TetherError).code, message: (e as Error).message } }));
        return;
      }
      for (const raw of msgs) {
        let req: ControlRequest;
        try {
          req = parseRequest(raw);
        } catch (e) {
          sock.write(encodeLine({ id: 0, error: { code: (e as TetherError).code, message: (e as Error).message } }));
          continue;
        }
        const progress: Progress = (p) => {
          if (!sock.destroyed) sock.write(encodeLine({ id: req.id, progress: p }));
        };
        this.#dispatch(req, progress).then(
          (result) => !sock.destroyed && sock.write(encodeLine({ id: req.id, result: result ?? null })),
          (e: unknown) => {
            const err = e as TetherError;
            if (!(e instanceof TetherError)) this.log.error('control request failed', { method: req.method, error: errorFields(e) });
            if (!sock.destroyed)
              sock.write(
                encodeLine({ id: req.id, error: { code: err.code ?? 'ERR_INTERNAL', message: err.message, details: err.details } }),
              );
          },
        );
      }
    });
  }

  async #dispatch(req: ControlRequest, progress: Progress): Promise<unknown> {
    const p = req.params;
    const vmName = (): string => {
      if (typeof p.vm !== 'string' || p.vm === '') throw new TetherError('ERR_USAGE', 'parameter vm (a VM name) is required');
      return p.vm;
    };
    switch (req.method) {
      case 'vm.start': {
        if (typeof p.config !== 'string') throw new TetherError('ERR_USAGE', 'parameter config (path to a VM YAML file) is required');
        const cfg = await loadVmConfig(p.config);
        const existing = this.vms.get(cfg.name);
        if (existing && existing.place !== 'stopped' && existing.place !== 'gone' && existing.place !== 'fenced') {
          throw new TetherError('ERR_VM_EXISTS', `VM ${cfg.name} is already ${existing.place} on this host`);
        }
        const vm = new VmInstance(this.host, cfg, this.log);
        this.vms.set(cfg.name, vm);
        await vm.boot();
        return this.#status(vm);
      }
      case 'vm.stop': {
        const vm = this.#vm(vmName());
        if (this.#outgoing.has(vm.name)) throw new TetherError('ERR_VM_BUSY', `VM ${vm.name} is migrating; abort first`);
        vm.place = 'stopped';
        await vm.stopQemu();
        await vm.removeRam();
        return this.#status(vm);
      }
      case 'status': {
        if (p.vm === undefined) return { host: this.host.name, vms: [...this.vms.values()].map((v) => this.#status(v)) };
        return this.#status(this.#vm(vmName()));
      }
      case 'migrate': {
        const vm = this.#vm(vmName());
        if (typeof p.to !== 'string') throw new TetherError('ERR_USAGE', 'parameter to (host:port of the destination daemon) is required');
        const to = parseHostPort(p.to);
        if (vm.place !== 'running') throw new TetherError('ERR_VM_NOT_RUNNING', `VM ${vm.name} is ${vm.place}, not running`);
        if (this.#outgoing.has(vm.name)) throw new TetherError('ERR_VM_BUSY', `VM ${vm.name} is already migrating`);
        const mig = new SourceMigration({ host: this.host, vm, to, onProgress: progress, metrics: this.metrics });
        this.#outgoing.set(vm.name, mig);
        vm.place = 'migrating-out';
        try {
          const result = await mig.run();
          vm.lastMigration = result as unknown as Record<string, unknown>;
          if (result.outcome === 'completed') this.vms.delete(vm.name);
          return result;
        } finally {
          this.#outgoing.delete(vm.name);
        }
      }
      case 'abort': {
        const name = vmName();
        const out = this.#outgoing.get(name);
        if (out) {
          out.abort('operator-abort');
          return { aborted: name, role: 'source' };
        }
        const inc = this.#incoming.get(name);
        if (inc) {
          await inc.fence('operator-abort');
          return { aborted: name, role: 'destination' };
        }
        throw new TetherError('ERR_NO_MIGRATION', `VM ${name} is not migrating on this host`);
      }
      default:
        throw new TetherError('ERR_USAGE', `unknown method ${req.method}`);
    }
  }

  #vm(name: string): VmInstance {
    const vm = this.vms.get(name);
    if (!vm) throw new TetherError('ERR_NO_SUCH_VM', `no VM named ${name} on host ${this.host.name}`);
    return vm;
  }

  #status(vm: VmInstance): Record<string, unknown> {
    const out = this.#outgoing.get(vm.name);
    const inc = this.#incoming.get(vm.name);
    return {
      vm: vm.name,
      host: this.host.name,
      state: vm.place,
      pid: vm.qemu && !vm.qemu.hasExited ? vm.qemu.pid : null,
      memoryMiB: vm.config.memoryMiB,
      serialLog: vm.serialLog,
      ramFile: vm.ramFile,
      migration: out
        ? { role: 'source', phase: out.phase.state, appliedEpoch: out.appliedEpoch }
        : inc
          ? { role: 'destination', phase: inc.phase.state }
          : null,
      lastMigration: vm.lastMigration ?? null,
    };
  }

  // ---- peer port (incoming migrations) ----

  async #servePeer(sock: net.Socket): Promise<void> {
    sock.on('error', () => {});
    let ch: PeerChannel;
    try {
      ch = await PeerChannel.accept(sock, { psk: this.host.peer.key });
    } catch (e) {
      this.log.warn('peer rejected', { remote: sock.remoteAddress, error: errorFields(e) });
      return;
    }
    let dest: DestinationMigration | undefined;
    ch.on('close', (err) => dest?.onChannelClosed(err));
    ch.on('message', (m) => {
      if (dest) {
        dest.onMessage(m);
        return;
      }
      try {
        if (m.type !== 'control') throw new TetherError('ERR_PEER_PROTOCOL', `expected prepare, got ${m.type}`);
        const c = asPeerControl(m.body);
        if (c.kind !== 'prepare') throw new TetherError('ERR_PEER_PROTOCOL', `expected prepare, got ${c.kind}`);
        const cfg = parseVmConfig(c.vm as unknown as Record<string, unknown>, { baseDir: '/' });
        const existing = this.vms.get(cfg.name);
        if (existing && !['stopped', 'gone', 'fenced'].includes(existing.place)) {
          throw new TetherError('ERR_VM_EXISTS', `VM ${cfg.name} is already ${existing.place} on ${this.host.name}`);
        }
        dest = new DestinationMigration({
          host: this.host,
          channel: ch,
          vmConfig: cfg,
          sendConfiguration: c.sendConfiguration,
          log: this.log,
          faults: this.#faults,
          onInstance: (vm) => this.vms.set(vm.name, vm),
        });
        this.#incoming.set(cfg.name, dest);
        const d = dest;
        void d.run();
        void d.done.promise.then((phase) => {
          this.#incoming.delete(cfg.name);
          this.metrics.migrations.inc({ role: 'destination', outcome: phase });
          this.log.info('incoming migration ended', { vm: cfg.name, phase });
        });
      } catch (e) {
        this.log.warn('incoming migration refused', { error: errorFields(e) });
        const err = e as TetherError;
        ch.send({ type: 'abort', code: err.code ?? 'ERR_PEER_PROTOCOL', reason: err.message })
          .catch(() => {})
          .finally(() => ch.close());
      }
    });
    ch.start();
  }
}

/** Live QEMU processes whose command line names this RAM file. */
function qemuPidsFor(ramFile: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const argv = readFileSync(`/proc/${d}/cmdline`, 'latin1').split('\0');
      if (/qemu-system/.test(argv[0] ?? '') && argv.some((a) => a.includes(`mem-path=${qemuOptValue(ramFile)},`))) out.push(Number(d));
    } catch {
      /* gone meanwhile */
    }
  }
  return out;
}

/** SIGKILL a process we did not spawn and wait until it is gone. */
async function killPid(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return;
  }
  for (let i = 0; i < 500; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new TetherError('ERR_RECOVERY', `QEMU pid ${pid} did not die`);
}

function listen(server: net.Server, opts: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) =>
      reject(new TetherError('ERR_LISTEN', `cannot listen on ${opts.path ?? `${opts.host}:${opts.port}`}: ${e.code ?? e.message}`)),
    );
    server.listen(opts, () => resolve());
  });
}

export function parseHostPort(s: string): { host: string; port: number } {
  const m = /^(.+):(\d{1,5})$/.exec(s);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port < 1 || port > 65535) throw new TetherError('ERR_USAGE', `'${s}' is not host:port`);
  return { host: m[1]!.replace(/^\[(.*)\]$/, '$1'), port };
}
