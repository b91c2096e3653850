/**
 * One VM on this host (VmInstance): its files, its current QEMU, where it is (`place`, a
 * checked StateMachine: place.ts), and the destination's disk window. Its durable records
 * are read and written by records.ts.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import type { HostConfig, VmConfig } from '../config/types.ts';
import { TetherError } from '../errors.ts';
import { findJournalLogs } from '../disk/journal-log.ts';
import type { BlockDevice } from '../disk/block-device.ts';
import { FileBlockDevice } from '../disk/file-device.ts';
import { NbdServer } from '../nbd/server.ts';
import { DISK_NODE, FILE_NODE, NBD_NODE, type NicRelayPaths } from '../qemu/cmdline.ts';
import { queryNamedBlockNodes } from '../qemu/commands.ts';
import { switchDiskToFile } from '../qemu/disk-switch.ts';
import type { QemuIdentity } from '../qemu/identity.ts';
import { QemuProcess } from '../qemu/process.ts';
import { claimNicTaps } from '../net/tap.ts';
import type { Logger } from '../util/log.ts';
import { StateMachine } from '../util/state.ts';
import { INITIAL_PLACE, PLACE_TRANSITIONS, type VmPlace } from './place.ts';
import {
  readMarker,
  readPersisted,
  readStandby,
  readUnrecovered,
  writeMarker,
  writePersisted,
  writeStandby,
  writeUnrecovered,
  type MigrationMarker,
  type UnrecoveredCause,
} from './records.ts';

// Moved to place.ts and records.ts; re-exported for the callers that import them from here.
export type { VmPlace } from './place.ts';
export { MARKER_VERSION, type MigrationMarker, type PersistedVm, type UnrecoveredCause } from './records.ts';

/** The default diskDevice hook: the image itself, pass-through. */
export const passThroughDevice = (image: FileBlockDevice): BlockDevice => image;

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
  /** NIC i's relay sockets for a destination's window: <dir>/rin<i>.sock, <dir>/rout<i>.sock. */
  readonly nicRelays: readonly NicRelayPaths[];
  /** The sidecar's NBD server for the VM's disk inside a destination's post-copy window: QEMU's -blockdev nbd connects here. */
  readonly nbdSocket: string;
  /** Where the destination journal's write-ahead logs of this VM live (host journalDir). */
  readonly journalDir: string;
  readonly log: Logger;
  /** Where the VM is (the `place` accessor): moves checked against PLACE_TRANSITIONS, and logged. */
  readonly #place: StateMachine<VmPlace>;
  qemu: QemuProcess | undefined;
  /**
   * Whether this VM's QEMU sends the migration stream's configuration section.
   * A QEMU restored from a device-state file runs with
   * `migration.send-configuration=off` (the file has no such section), and that
   * property cannot be changed at run time: its outgoing streams then lack the
   * section, so the next destination must not expect one either.
   */
  sendConfiguration = true;
  /**
   * Serves the VM's disk only inside a destination's post-copy window (docs/disk.md): from
   * before the incoming QEMU starts until the switch to QEMU's own file node at completion
   * (detachDiskWindow). Undefined otherwise: in steady state QEMU opens the image itself.
   */
  nbd: NbdServer | undefined;
  /** The image as the sidecar opened it for the window (no locks taken: see docs/disk.md). */
  image: FileBlockDevice | undefined;
  /**
   * Hook for what the NBD server serves when it starts: the destination's block-write
   * journal over the image; the image itself only for a QEMU adopted inside its window whose
   * journal is gone (daemon recovery), until that QEMU is switched to its file node.
   */
  diskDevice: (image: FileBlockDevice) => BlockDevice = passThroughDevice;
  /** Free-form facts shown by `tether status` (last migration outcome and figures). */
  lastMigration: Record<string, unknown> | undefined;
  /** Set while place is 'unrecovered': why (persisted in unrecovered.json). */
  unrecovered: UnrecoveredCause | undefined;

  constructor(host: HostConfig, config: VmConfig, log: Logger) {
    this.name = config.name;
    this.config = config;
    this.dir = path.join(host.stateDir, config.name);
    this.journalDir = host.journalDir ?? path.join(host.stateDir, 'journal');
    this.ramFile = path.join(host.ramDir, `${config.name}.ram`);
    this.checkpointDir = path.join(host.ramDir, `${config.name}.ckpt`);
    // unix socket paths are limited to 107 bytes: keep the QMP socket short-named
    this.qmpSocket = path.join(this.dir, 'qmp.sock');
    this.serialLog = path.join(this.dir, 'serial.log');
    this.qemuLog = path.join(this.dir, 'qemu.log');
    this.nicRelays = (config.nics ?? []).map((_, i) => ({
      in: path.join(this.dir, `rin${i}.sock`),
      out: path.join(this.dir, `rout${i}.sock`),
    }));
    for (const s of this.nicRelays.map((r) => r.out)) {
      if (Buffer.byteLength(s) > 107) {
        throw new TetherError('ERR_CONFIG_INVALID', `NIC socket ${s} is longer than 107 bytes (unix socket limit): shorten stateDir`, {
          field: 'stateDir',
        });
      }
    }
    this.nbdSocket = path.join(this.dir, 'nbd.sock');
    this.log = log.child({ vm: config.name });
    this.#place = new StateMachine<VmPlace>(`vm ${config.name} place`, INITIAL_PLACE, PLACE_TRANSITIONS, this.log);
  }

  /** Where the VM is (place.ts). */
  get place(): VmPlace {
    return this.#place.state;
  }

  /**
   * Moves the VM to `to`: a move PLACE_TRANSITIONS does not list throws ERR_STATE_TRANSITION
   * (and changes nothing); every move is logged. Assigning the current place is a no-op.
   */
  set place(to: VmPlace) {
    if (to !== this.#place.state) this.#place.to(to);
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
    await this.#dropStaleRecords();
    await fs.rm(this.ramFile, { force: true });
    await this.#start(undefined);
    this.place = 'running';
  }

  /** Destination side: QEMU waiting for `migrate-incoming`. */
  async startIncoming(sendConfiguration = true): Promise<void> {
    await this.prepareDirs();
    await this.#dropStaleRecords();
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
   * Before a new QEMU of this VM starts here: records an earlier migration left behind (a
   * marker, a completion request or record whose clean-up a crash cut short) must never be
   * read by a later recovery as this QEMU's: they would make it kill or pause a VM that runs.
   */
  async #dropStaleRecords(): Promise<void> {
    await this.setMigrationMarker(null);
    await fs.rm(path.join(this.dir, 'completing.json'), { force: true });
    await fs.rm(this.checkpointDir, { recursive: true, force: true });
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
    // The disk: QEMU's own file node, except for the destination's incoming QEMU, whose
    // window (the journal's NBD server) the migration opened first (startDisk).
    if (this.nbd && incoming?.kind !== 'defer') {
      throw new TetherError('ERR_JOURNAL_STATE', `VM ${this.name}: the disk window is open; only an incoming QEMU may use it`);
    }
    this.qemu = await QemuProcess.start({
      vm,
      ramFile: this.ramFile,
      qmpSocket: this.qmpSocket,
      serialLog: this.serialLog,
      // the destination's QEMU (the only one started with -incoming defer here) gets the window's relays
      nicTaps: await claimNicTaps(this.config),
      ...(incoming?.kind === 'defer' ? { nicRelays: this.nicRelays } : {}),
      ...(this.config.disk && this.nbd ? { nbdSocket: this.nbdSocket } : {}),
      logFile: this.qemuLog,
      log: this.log,
      ...(incoming ? { incoming } : {}),
      // recorded the moment it exists: a sidecar dying during QEMU's start-up still finds it
      onSpawned: (id) => this.#persist(id),
    });
    this.log.info('qemu started', { pid: this.qemu.pid, incoming: incoming?.kind ?? 'none' });
    await this.#persist();
    this.#watch(this.qemu);
  }

  /** Take over the QEMU an earlier sidecar left running for this VM. */
  async adopt(id: QemuIdentity, timeoutMs?: number): Promise<void> {
    this.qemu = await QemuProcess.adopt({
      id,
      qmpSocket: this.qmpSocket,
      logFile: this.qemuLog,
      log: this.log,
      ...(timeoutMs ? { timeoutMs } : {}),
    });
    // A QEMU caught inside its disk window is reconnecting to nbd.sock (reconnect-delay):
    // serve it again. Any other QEMU does its own disk I/O and needs nothing from this sidecar.
    if (this.config.disk && (await this.diskWindowOpen())) await this.startDisk();
    this.log.info('qemu adopted', { pid: id.pid, diskWindow: this.nbd !== undefined });
    this.#watch(this.qemu);
    await this.#persist();
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
  async #persist(id: QemuIdentity | undefined = this.qemu?.identity): Promise<void> {
    await writePersisted(this.dir, {
      config: this.config,
      sendConfiguration: this.sendConfiguration,
      pid: id?.pid ?? null,
      startTime: id?.startTime ?? null,
    });
  }

  /** Record a hot standby the moment it is spawned (<dir>/standby.json): a restarted sidecar kills it by this identity. */
  async recordStandby(id: QemuIdentity): Promise<void> {
    await writeStandby(this.dir, id);
  }

  /** The last hot standby recorded for `dir` (records.ts). */
  static readonly readStandby = readStandby;
  /** unrecovered.json of `dir` (records.ts). */
  static readonly readUnrecovered = readUnrecovered;
  /** vm.json of `dir` (records.ts). */
  static readonly readPersisted = readPersisted;
  /** The migration marker of `dir` (records.ts). */
  static readonly readMarker = readMarker;

  /** Leave the VM unrecovered for `cause`, durably: a restart keeps it so until an operator resolves it. */
  async markUnrecovered(code: string, message: string): Promise<void> {
    this.place = 'unrecovered';
    this.unrecovered = { code, message, at: new Date().toISOString() };
    await writeUnrecovered(this.dir, this.unrecovered);
  }

  /** The operator resolved it (tether vm adopt / forget). */
  async clearUnrecovered(): Promise<void> {
    this.unrecovered = undefined;
    await fs.rm(path.join(this.dir, 'unrecovered.json'), { force: true });
  }

  /** The VM left this host for good: a restarted sidecar must not list it. */
  async forget(): Promise<void> {
    await fs.rm(path.join(this.dir, 'vm.json'), { force: true });
  }

  /**
   * The source, once the destination confirmed a completed migration: drop this host's records
   * of the VM in the one safe order. vm.json first (a restart no longer lists the VM), then the
   * marker, then the checkpoints with completed.json and the RAM file: at no step can a restart
   * find a source marker without the completion record (it would try to resume the VM here)
   * or a VM listed `stopped` here while it runs on the destination. `afterStep(n)` is the fault
   * seam (crash-cleanup-step).
   */
  async dropCompletedSource(afterStep: (n: number) => void = noStep): Promise<void> {
    await this.forget();
    afterStep(1);
    await this.setMigrationMarker(null);
    afterStep(2);
    await this.removeRam();
    afterStep(3);
  }

  /**
   * The destination, once the VM runs here after the source's `completed`: the marker goes
   * before the completion request. A restart that finds the request without the marker adopts
   * the VM; one that found the marker without the request would fence (kill) the only running
   * copy - days later, if the marker's removal had failed. If removing the marker fails, the
   * request stays (a restart then waits, paused, rather than kills).
   */
  async dropCompletingRecords(afterStep: (n: number) => void = noStep): Promise<void> {
    await this.setMigrationMarker(null);
    afterStep(1);
    await fs.rm(path.join(this.dir, 'completing.json'), { force: true });
    afterStep(2);
  }

  /** Marks a migration in progress: a sidecar restarted before it ends must resolve it. */
  async setMigrationMarker(m: MigrationMarker | null): Promise<void> {
    // The migrating QEMU is named by pid + start time: a restarted sidecar never takes a
    // process that reused the pid for it.
    const q = this.qemu;
    const rec = m && m.qemuPid !== null && q && q.pid === m.qemuPid && q.startTime ? { ...m, qemuStartTime: q.startTime } : m;
    await writeMarker(this.dir, rec);
  }

  async killQemu(): Promise<void> {
    const q = this.qemu;
    if (!q) return;
    await q.kill();
  }

  /** Sidecar shutdown: let go of QEMU without stopping it (the next sidecar adopts it). */
  async detachQemu(): Promise<void> {
    await this.qemu?.detach();
  }

  async stopQemu(): Promise<void> {
    const q = this.qemu;
    if (!q) return;
    await q.stop();
  }

  /** Whether this VM's QEMU reads its disk through the sidecar (an NBD node exists). */
  async diskWindowOpen(): Promise<boolean> {
    const q = this.qemu;
    if (!q || !this.config.disk) return false;
    const nodes = await queryNamedBlockNodes(q.qmp);
    return nodes.some((n) => n['node-name'] === NBD_NODE);
  }

  /**
   * Close the destination's disk window: QEMU's raw node `disk0` moves from the sidecar's NBD
   * export onto QEMU's own file node on the image, and the sidecar stops serving it. The
   * caller guarantees the order (docs/disk.md): the journal is written back to the image
   * (nothing is held any more) and the source has recorded completion (its QEMU, a post-copy
   * source, inactivated its image at switchover: it holds no lock). blockdev-reopen drains
   * disk0 first, so every request on nbd0 has completed before the first one reaches f0
   * (qemu/disk-switch.ts). Returns the reopen's duration (the guest's I/O is held by the drain
   * meanwhile). On a failed reopen the file node is removed again and the disk stays on NBD.
   */
  async detachDiskWindow(): Promise<{ reopenMs: number; totalMs: number }> {
    const q = this.qemu;
    const disk = this.config.disk;
    if (!q || !disk) throw new TetherError('ERR_JOURNAL_STATE', `VM ${this.name}: no QEMU or no disk to switch`);
    const t0 = performance.now();
    const reopenMs = await switchDiskToFile(q.qmp, disk.image, this.log);
    // Writes the server acknowledged pass-through reached the page cache: durable before we let go.
    await this.image?.flush();
    await this.stopDisk();
    const r = { reopenMs: round2(reopenMs), totalMs: round2(performance.now() - t0) };
    this.log.info('disk window closed: QEMU does its own I/O on the image', { node: DISK_NODE, file: FILE_NODE, ...r });
    return r;
  }

  /**
   * Open the destination's disk window (no-op without a disk, or when already open): open the
   * image and listen on nbd.sock before the incoming QEMU starts, so that QEMU finds it.
   */
  async startDisk(): Promise<void> {
    if (!this.config.disk || this.nbd) return;
    await this.prepareDirs();
    if (this.diskDevice === passThroughDevice) {
      // A destination journal's log of this VM is left (a restart whose recovery did not
      // settle it): the image must not be served pass-through before its outcome is known.
      const logs = await findJournalLogs(this.journalDir, this.name);
      if (logs.length > 0) {
        throw new TetherError('ERR_JOURNAL_PENDING', `VM ${this.name} has a journal log of an unfinished incoming migration: ${logs[0]}`, {
          logs,
        });
      }
    }
    const image = await FileBlockDevice.open(this.config.disk.image);
    try {
      const server = new NbdServer({ device: this.diskDevice(image), exportName: this.name, log: this.log });
      await server.listen(this.nbdSocket);
      this.image = image;
      this.nbd = server;
    } catch (e) {
      await image.close();
      throw e;
    }
  }

  /** Stop serving the disk (running requests finish first) and close the image. */
  async stopDisk(): Promise<void> {
    const server = this.nbd;
    const image = this.image;
    this.nbd = undefined;
    this.image = undefined;
    if (server) {
      await server.close();
      if (server.device !== image) await server.device.close();
    }
    await image?.close();
  }

  /** Drop the RAM file and the disk server (after the VM moved away, stopped, or was fenced). */
  async removeRam(): Promise<void> {
    await this.stopDisk();
    await fs.rm(this.ramFile, { force: true });
    await fs.rm(this.checkpointDir, { recursive: true, force: true });
  }
}

function round2(x: number): number {
  return Math.round(x * 100) / 100;
}

/** The default `afterStep` of the record drops: no fault seam. */
function noStep(): void {}
