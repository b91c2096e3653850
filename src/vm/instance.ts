import fs from 'node:fs/promises';
import path from 'node:path';
import type { HostConfig, VmConfig } from '../config/types.ts';
import { TetherError } from '../errors.ts';
import { QemuProcess } from '../qemu/process.ts';
import type { Logger } from '../util/log.ts';

export interface PersistedVm {
  config: VmConfig;
  sendConfiguration: boolean;
  pid: number | null;
}

export interface MigrationMarker {
  role: 'source' | 'destination';
  /** The QEMU that was migrating: after a restart, any other QEMU on the RAM file is a newer one. */
  qemuPid: number | null;
  peer: string;
  startedAt: string;
}

async function writeFileAtomic(file: string, data: string): Promise<void> {
  const tmp = `${file}.tmp`;
  const fh = await fs.open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, file);
}

export type VmPlace = 'stopped' | 'running' | 'migrating-out' | 'migrating-in' | 'rolling-back' | 'fenced' | 'gone';

/**
 * One VM on this host: its files and its current QEMU process. The RAM file
 * outlives QEMU processes on purpose: rollback restarts QEMU over the same file.
 */
export class VmInstance {
  readonly name: string;
  readonly config: VmConfig;
  readonly dir: string;
  readonly ramFile: string;
  /** Checkpoint stage, device states and the applied record: next to the RAM file, in
   * the same durability domain (a restore needs both, and nothing else). */
  readonly checkpointDir: string;
  readonly qmpSocket: string;
  readonly serialLog: string;
  readonly qemuLog: string;
  readonly log: Logger;
  place: VmPlace = 'stopped';
  qemu: QemuProcess | undefined;
  /**
   * Whether this VM's QEMU sends the migration stream's configuration section.
   * A QEMU restored from a device-state file runs with
   * `migration.send-configuration=off` (the file has no such section), and that
   * property cannot be changed at run time: its outgoing streams then lack the
   * section, so the next destination must not expect one either.
   */
  sendConfiguration = true;
  /** Free-form facts shown by `tether status` (last migration outcome and figures). */
  lastMigration: Record<string, unknown> | undefined;

  constructor(host: HostConfig, config: VmConfig, log: Logger) {
    this.name = config.name;
    this.config = config;
    this.dir = path.join(host.stateDir, config.name);
    this.ramFile = path.join(host.ramDir, `${config.name}.ram`);
    this.checkpointDir = path.join(host.ramDir, `${config.name}.ckpt`);
    // unix socket paths are limited to 107 bytes: keep the QMP socket short-named
    this.qmpSocket = path.join(this.dir, 'qmp.sock');
    this.serialLog = path.join(this.dir, 'serial.log');
    this.qemuLog = path.join(this.dir, 'qemu.log');
    this.log = log.child({ vm: config.name });
  }

  get ramBytes(): number {
    return this.config.memoryMiB * 1024 * 1024;
  }

  async prepareDirs(): Promise<void> {
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    await fs.mkdir(path.dirname(this.ramFile), { recursive: true, mode: 0o700 });
  }

  /** Fresh boot: a new RAM file, a new QEMU. */
  async boot(): Promise<void> {
    await this.prepareDirs();
    await fs.rm(this.ramFile, { force: true });
    await this.#start(undefined);
    this.place = 'running';
  }

  /** Destination side: QEMU waiting for `migrate-incoming`. */
  async startIncoming(sendConfiguration = true): Promise<void> {
    await this.prepareDirs();
    await fs.rm(this.ramFile, { force: true });
    this.sendConfiguration = sendConfiguration;
    await this.#start({ kind: 'defer' });
    this.place = 'migrating-in';
  }

  /** Source rollback: a fresh QEMU over the same RAM file, loading device state only. */
  async restoreFrom(devstatePath: string): Promise<void> {
    this.sendConfiguration = false;
    await this.#start({ kind: 'exec-file', file: devstatePath });
  }

  /**
   * A hot standby (src/migrate/standby.ts) becomes this VM's QEMU: recorded in vm.json
   * before it is handed device state, so a restarted sidecar adopts it.
   */
  async adoptStandby(q: QemuProcess): Promise<void> {
    this.qemu = q;
    this.sendConfiguration = false;
    await this.#persist();
    this.#watch(q);
  }

  async #start(incoming: { kind: 'defer' } | { kind: 'exec-file'; file: string } | undefined): Promise<void> {
    if (this.qemu && !this.qemu.hasExited) {
      throw new TetherError('ERR_VM_ALREADY_RUNNING', `VM ${this.name} already has a running QEMU (pid ${this.qemu.pid})`);
    }
    const vm =
      incoming?.kind === 'defer' && !this.sendConfiguration
        ? {
            ...this.config,
            qemu: { ...this.config.qemu, extraArgs: [...this.config.qemu.extraArgs, '-global', 'migration.send-configuration=off'] },
          }
        : this.config;
    this.qemu = await QemuProcess.start({
      vm,
      ramFile: this.ramFile,
      qmpSocket: this.qmpSocket,
      serialLog: this.serialLog,
      logFile: this.qemuLog,
      ...(incoming ? { incoming } : {}),
    });
    this.log.info('qemu started', { pid: this.qemu.pid, incoming: incoming?.kind ?? 'none' });
    await this.#persist();
    this.#watch(this.qemu);
  }

  /** Take over the QEMU an earlier sidecar left running for this VM. */
  async adopt(pid: number): Promise<void> {
    this.qemu = await QemuProcess.adopt({ pid, qmpSocket: this.qmpSocket, logFile: this.qemuLog });
    this.log.info('qemu adopted', { pid });
    this.#watch(this.qemu);
  }

  #watch(q: QemuProcess): void {
    // Supervision: a QEMU that dies on its own while the VM is simply running here
    // leaves the VM stopped (migrations watch their own QEMU and decide themselves).
    void q.exited.then((st) => {
      if (this.qemu === q && this.place === 'running') {
        this.place = 'stopped';
        this.log.error('qemu exited unexpectedly', { pid: q.pid, code: st.code, signal: st.signal, stderr: q.stderrTail() });
      }
    });
  }

  /** What a restarted sidecar needs to find this VM again. */
  async #persist(): Promise<void> {
    const rec: PersistedVm = { config: this.config, sendConfiguration: this.sendConfiguration, pid: this.qemu?.pid ?? null };
    await writeFileAtomic(path.join(this.dir, 'vm.json'), JSON.stringify(rec));
  }

  /** The VM left this host for good: a restarted sidecar must not list it. */
  async forget(): Promise<void> {
    await fs.rm(path.join(this.dir, 'vm.json'), { force: true });
  }

  /** Marks a migration in progress: a sidecar restarted before it ends must resolve it. */
  async setMigrationMarker(m: MigrationMarker | null): Promise<void> {
    const file = path.join(this.dir, 'migration.json');
    if (m === null) await fs.rm(file, { force: true });
    else await writeFileAtomic(file, JSON.stringify(m));
  }

  static async readPersisted(dir: string): Promise<{ vm: PersistedVm; marker: MigrationMarker | null } | null> {
    let vm: PersistedVm;
    try {
      vm = JSON.parse(await fs.readFile(path.join(dir, 'vm.json'), 'utf8')) as PersistedVm;
    } catch {
      return null;
    }
    let marker: MigrationMarker | null = null;
    try {
      marker = JSON.parse(await fs.readFile(path.join(dir, 'migration.json'), 'utf8')) as MigrationMarker;
    } catch {
      /* no migration in progress */
    }
    return { vm, marker };
  }

  async killQemu(): Promise<void> {
    const q = this.qemu;
    if (!q) return;
    await q.kill();
  }

  async stopQemu(): Promise<void> {
    const q = this.qemu;
    if (!q) return;
    await q.stop();
  }

  /** Drop the RAM file (after the VM moved away or was fenced). */
  async removeRam(): Promise<void> {
    await fs.rm(this.ramFile, { force: true });
    await fs.rm(this.checkpointDir, { recursive: true, force: true });
  }
}
