import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { loadVmConfig, parseVmConfig, PEER_DEFAULTS } from '../config/load.ts';
import type { HostConfig, VmConfig } from '../config/types.ts';
import { encodeLine, LineDecoder, parseRequest } from '../control/codec.ts';
import type { ControlRequest } from '../control/codec.ts';
import { CheckpointStore, readCompletingRecord } from '../checkpoint/store.ts';
import { ImageSink } from '../disk/image-sink.ts';
import { FileBlockDevice } from '../disk/file-device.ts';
import { BlockJournal } from '../disk/journal.ts';
import { findJournalLogs } from '../disk/journal-log.ts';
import { restartJournal } from '../disk/journal-restart.ts';
import { isTetherError, TetherError } from '../errors.ts';
import { completingRecordPath, DestinationMigration, staleResolve } from '../migrate/destination.ts';
import type { ResolveAnswer } from '../migrate/destination.ts';
import { cleanupCrashPoint, parseFaults } from '../migrate/faults.ts';
import type { Faults } from '../migrate/faults.ts';
import { notifyDestination } from '../migrate/completion/notify.ts';
import { announceRestored, resumeRestored, SourceMigration } from '../migrate/source.ts';
import { settleStandbys } from '../migrate/standby.ts';
import { isMigrationId } from '../epoch/id.ts';
import { asPeerControl } from '../peer/control.ts';
import type { PeerControl } from '../peer/control.ts';
import { TetherMetrics } from '../metrics/registry.ts';
import { identityAlive, killIdentity, procStartTime } from '../qemu/process.ts';
import type { QemuIdentity } from '../qemu/process.ts';
import { PeerChannel } from '../peer/channel.ts';
import http from 'node:http';
import type { Logger } from '../util/log.ts';
import { errorFields } from '../util/log.ts';
import { deviceModelDigest, deviceModelText } from '../vm/device-model.ts';
import { passThroughDevice, VmInstance } from '../vm/instance.ts';
import type { MigrationMarker, PersistedVm } from '../vm/instance.ts';
import { composeOutputs } from '../epoch/outputs.ts';
import { dropStaleRelays, NicPort, removeNicTaps } from '../net/nic.ts';
import { gateDefaults, gateReserve } from '../gate/reserve.ts';

/** How long a VM start or an incoming migration waits for QEMU's NIC sockets. */
const NIC_CONNECT_MS = 10_000;

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
  /** Incoming VMs whose completion request was pending when the sidecar restarted. */
  readonly #awaitingAnswer = new Map<string, { vm: VmInstance; epoch: number; migrationId: string; journal?: BlockJournal }>();
  /** Each VM's NIC ports on this host (TAP + gate + QEMU socket), in nics order. */
  readonly #nics = new Map<string, NicPort[]>();
  #control: net.Server | undefined;
  #peer: net.Server | undefined;
  #http: http.Server | undefined;
  readonly #clients = new Set<net.Socket>();
  /** Connections to the peer port still in their handshake. */
  #unauthenticated = 0;
  /** VM names whose vm.json was damaged at start: never booted over until resolved by hand. */
  readonly #damaged = new Set<string>();
  /** Resolves once every VM found at start has been recovered (or left unrecovered). */
  recovered: Promise<void> = Promise.resolve();
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
    // The control socket is born with its final mode (listenPrivate), in a directory only
    // this user enters when tether creates it: never a moment when another user can connect.
    await fs.mkdir(path.dirname(this.host.controlSocket), { recursive: true, mode: 0o700 });
    await fs.rm(this.host.controlSocket, { force: true });
    const pending = await this.#readRecords();
    this.#control = net.createServer((s) => this.#serveControl(s));
    await listenPrivate(this.#control, this.host.controlSocket);
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
    // Every VM at once, the sockets already open: one stuck VM does not hold the others
    // (their QEMUs give up on the NBD and NIC reconnects after ~15 s).
    this.recovered = Promise.all(pending.map((p) => this.#recoverOne(p))).then(() => {});
    this.log.info('daemon ready', {
      control: this.host.controlSocket,
      peer: `${this.host.peer.listen.host}:${this.host.peer.listen.port}`,
      faults: Object.keys(this.#faults).length ? this.#faults : undefined,
    });
  }

  /**
   * After a sidecar restart, step 1 (before the sockets open): read every VM record and list
   * each VM as `recovering`. Reading only: nothing is touched here.
   */
  async #readRecords(): Promise<Pending[]> {
    let names: string[];
    try {
      names = await fs.readdir(this.host.stateDir);
    } catch {
      return [];
    }
    const out: Pending[] = [];
    for (const name of names) {
      const dir = path.join(this.host.stateDir, name);
      const log = this.log.child({ vm: name, recovery: true });
      let vm: VmInstance;
      let saved: Awaited<ReturnType<typeof VmInstance.readPersisted>>;
      try {
        saved = await VmInstance.readPersisted(dir);
        if (!saved) continue;
        vm = new VmInstance(this.host, parseVmConfig(saved.config as unknown as Record<string, unknown>, { baseDir: '/' }), this.log);
        if (vm.name !== name) throw new TetherError('ERR_STATE_FILE_CORRUPT', `${dir}/vm.json describes VM ${vm.name}`);
      } catch (e) {
        // Without its record the VM cannot be found again; it must not be booted over either.
        this.#damaged.add(name);
        log.error('VM record damaged: not recovered, nothing touched; inspect it, then `tether vm forget` it to use the name again', {
          dir,
          error: errorFields(e),
        });
        continue;
      }
      vm.sendConfiguration = saved.sendConfiguration;
      vm.place = 'recovering';
      this.vms.set(vm.name, vm);
      out.push({ vm, saved, dir, log });
    }
    return out;
  }

  /**
   * After a sidecar restart, step 2 (every VM at once, the sockets already open): find each VM
   * again. A running QEMU is adopted (the guest does not notice). A migration that was in
   * progress is resolved the only safe way: as a source past switchover, re-apply a persisted
   * stage and resume from the last applied checkpoint (the old QEMU is wedged in post-copy); as
   * a source before switchover, cancel and keep the VM; as a destination, fence (the source
   * rolls back on its own). QEMUs are the ones the records name by pid + start time, nothing
   * else. Whatever cannot be decided, or fails, leaves the VM `unrecovered` with its cause.
   */
  async #recoverOne({ vm, saved, dir, log }: Pending): Promise<void> {
    try {
      const cause = await VmInstance.readUnrecovered(dir);
      if (cause) {
        vm.place = 'unrecovered';
        vm.unrecovered = cause;
        log.error('VM left unrecovered by an earlier start: nothing touched; resolve with `tether vm adopt` or `tether vm forget`', {
          cause: cause as unknown as Record<string, unknown>,
        });
        return;
      }
      const marker = await VmInstance.readMarker(dir);
      // Before anything serves the disk: a journal log left by this host's destination
      // side is written back (the log says completed), rebuilt (completion asked, outcome
      // unknown) or dropped (fenced). Never the image pass-through while the outcome is open.
      const completingEpoch = marker?.role === 'destination' ? await readCompletingRecord(completingRecordPath(vm)) : null;
      let journal: BlockJournal | undefined;
      /** The journal log recorded the source's answer `completed` (and was written back). */
      let answeredCompleted: { finalEpoch: number; migrationId: string } | null = null;
      if (vm.config.disk) {
        const disk = vm.config.disk;
        const jr = await restartJournal({
          journalDir: vm.journalDir,
          vm: vm.name,
          completingEpoch,
          migrationId: marker?.migrationId ?? null,
          journal: { maxBytes: disk.journalMaxBytes, log },
          openImage: () => FileBlockDevice.open(disk.image),
          log,
        });
        if (jr.kind === 'written-back') answeredCompleted = { finalEpoch: jr.finalEpoch, migrationId: jr.migrationId };
        if (jr.kind === 'journal') {
          vm.diskDevice = (image) => {
            journal = jr.device(image);
            return journal;
          };
        }
      }
      if (saved.pid !== null && typeof saved.startTime !== 'string') {
        throw new TetherError(
          'ERR_RECOVERY',
          `vm.json (written by an older tether) records QEMU pid ${saved.pid} without its start time: it cannot be told from a reused pid`,
          { pid: saved.pid },
        );
      }
      const recordedId = saved.pid !== null ? { pid: saved.pid, startTime: saved.startTime! } : null;
      // A hot standby that never got device state is not a VM's QEMU: killed first.
      const recorded = await settleStandbys(vm, recordedId && identityAlive(recordedId) ? recordedId : null, log);
      const migrating = markerQemu(marker, recordedId);
      const all = [recorded, migrating].filter((q, i, a): q is QemuIdentity => q !== null && a.findIndex((o) => o && same(o, q)) === i);
      let keepMarker = false;
      if (marker?.role === 'source' && (await CheckpointStore.readCompleted(vm.checkpointDir)) !== null) {
        await this.#recoverCompleted(vm, all, marker, log);
        keepMarker = true;
      } else if (marker?.role === 'destination' && completingEpoch !== null) {
        // vm.json names the incoming QEMU too; any other QEMU recorded for the VM is not it
        if (recorded && !(migrating && same(recorded, migrating))) await killQemu(recorded);
        await this.#recoverCompleting(vm, migrating, marker, completingEpoch, log, () => journal);
        keepMarker = true;
        if (
          answeredCompleted?.migrationId === marker.migrationId &&
          answeredCompleted.finalEpoch === completingEpoch &&
          vm.place === 'migrating-in'
        ) {
          // Killed during the write-back, before the completion records were dropped: the
          // source had answered `completed` (the log says so) and had this side's RESOLVED, so
          // it does not answer again. Its answer is known: act on it now.
          log.warn('the journal log recorded the source answer completed: the VM runs here', {
            migrationId: marker.migrationId,
            finalEpoch: completingEpoch,
          });
          this.#answerRecovered({ vm: vm.name, migrationId: marker.migrationId, outcome: 'completed', epoch: completingEpoch });
        }
      } else if (marker?.role === 'destination') {
        for (const q of all) await killQemu(q);
        await vm.removeRam();
        vm.place = 'fenced';
        log.warn('incoming migration interrupted by a sidecar restart: fenced', { migrationId: marker.migrationId });
      } else if (marker?.role === 'source') {
        // A QEMU other than the one that was migrating was started by a rollback
        // that got as far as recording it: it runs the VM now (or is about to: it may still
        // wait, paused, for its NICs and `cont`), so it is adopted, never restored over.
        if (recorded && !(migrating && same(recorded, migrating))) {
          if (migrating) await killQemu(migrating);
          await vm.adopt(recorded);
          await this.#runAdopted(vm, log);
          log.warn('sidecar restarted after a rollback had restored the VM: adopted the restored QEMU', { pid: recorded.pid });
        } else {
          await this.#recoverSource(vm, migrating, marker, log);
        }
      } else if (recorded) {
        await vm.adopt(recorded);
        await this.#runAdopted(vm, log);
      } else {
        vm.place = 'stopped';
        log.warn('VM was not running when the sidecar restarted');
      }
      if (!keepMarker) await vm.setMigrationMarker(null);
      if (vm.place === 'running' && !this.#nics.has(vm.name)) {
        // QEMU's tap backend never noticed the old sidecar die. A window's filters the old
        // sidecar did not get to detach (it died right after completion) would cut the
        // guest off: drop them.
        if (vm.qemu) await dropStaleRelays(vm.qemu.qmp, vm.config.nics?.length ?? 0);
        const ports = this.#createNics(vm, 'pass');
        await this.#openNics(vm, ports);
      } else if (vm.place !== 'running' && vm.place !== 'migrating-in') {
        for (const nic of vm.config.nics ?? []) await removeNicTaps(nic.tap);
      }
    } catch (e) {
      // Never `stopped`: a QEMU of this VM may still run, or its only copy may be elsewhere.
      const err = e as TetherError;
      await this.#letGo(vm);
      await vm.markUnrecovered(err.code ?? 'ERR_RECOVERY', err.message).catch(() => {
        vm.place = 'unrecovered';
        vm.unrecovered = { code: err.code ?? 'ERR_RECOVERY', message: err.message, at: new Date().toISOString() };
      });
      log.error('recovery failed: VM left unrecovered; resolve with `tether vm adopt` or `tether vm forget`', { error: errorFields(e) });
    }
  }

  /**
   * An adopted QEMU must be running before the VM is shown running. A restored or promoted
   * QEMU (no configuration section: sendConfiguration false) found paused or still loading is
   * resumed the way a live rollback does it - NICs connected, `cont`, MAC announcement;
   * anything else not running is not guessed at (ERR_RECOVERY: the VM is left unrecovered).
   */
  async #runAdopted(vm: VmInstance, log: Logger): Promise<void> {
    const q = vm.qemu!;
    await closeAdoptedWindow(vm, log);
    const { status } = await q.qmp.execute<{ status: string }>('query-status', undefined, { timeoutMs: QMP_RECOVERY_MS });
    // 'suspended': the guest put itself to sleep (ACPI S3); it runs as far as tether is concerned
    if (status !== 'running' && status !== 'suspended') {
      if (vm.sendConfiguration || !['paused', 'inmigrate', 'prelaunch'].includes(status)) {
        throw new TetherError('ERR_RECOVERY', `QEMU pid ${q.pid} is ${status}, not running, and no record says why`, {
          pid: q.pid,
          status,
        });
      }
      await resumeRestored(vm, () => this.#openNics(vm, this.#createNics(vm, 'pass')));
      await announceRestored(vm);
      log.warn('restored QEMU found paused after a sidecar restart: resumed and announced', { pid: q.pid, was: status });
    }
    vm.place = 'running';
  }

  /**
   * The source recorded completion before the sidecar died: the VM belongs to the
   * destination, whatever state the channel was in. Never resume it here; drop this host's
   * copy and repeat the answer until the destination confirms (it waits with its guest paused).
   */
  async #recoverCompleted(vm: VmInstance, qemus: QemuIdentity[], marker: MigrationMarker, log: Logger): Promise<void> {
    const { migrationId } = marker;
    const finalEpoch = (await CheckpointStore.readCompleted(vm.checkpointDir))!;
    for (const q of qemus) await killQemu(q);
    await fs.rm(vm.ramFile, { force: true });
    vm.place = 'gone';
    vm.lastMigration = { migrationId, outcome: 'completed', reason: 'sidecar-restart', finalEpoch, handover: 'pending' };
    this.metrics.migrations.inc({ role: 'source', outcome: 'completed' });
    log.warn('sidecar restarted after the migration completed: the VM is not resumed here', { migrationId, finalEpoch });
    void notifyDestination({
      psk: this.host.peer.key,
      to: parseHostPort(marker.peer),
      migrationId,
      vm: vm.name,
      outcome: 'completed',
      epoch: finalEpoch,
      log,
    }).then(async (handover) => {
      vm.lastMigration = { ...vm.lastMigration, handover };
      await vm.dropCompletedSource(cleanupCrashPoint(this.#faults)).catch(() => {});
    });
  }

  /**
   * This host had asked the source to complete when its sidecar died: the source may have
   * recorded completion, so the incoming VM (frozen by its guard) is kept, paused, until the
   * source's answer arrives (#servePeer). Between SIGCONT and QMP stop the guest runs for a
   * moment with its devices' backends gone: nothing it emits can leave the host.
   */
  async #recoverCompleting(
    vm: VmInstance,
    migrating: QemuIdentity | null,
    marker: MigrationMarker,
    epoch: number,
    log: Logger,
    journal: () => BlockJournal | undefined,
  ): Promise<void> {
    const { migrationId } = marker;
    if (migrating === null) {
      await vm.removeRam();
      for (const f of await findJournalLogs(vm.journalDir, vm.name)) await fs.rm(f, { force: true });
      vm.diskDevice = passThroughDevice;
      await fs.rm(completingRecordPath(vm), { force: true });
      vm.place = 'fenced';
      log.error('asked to complete, but the incoming QEMU is gone: the VM may be lost', { migrationId, finalEpoch: epoch });
      return;
    }
    if (identityAlive(migrating)) process.kill(migrating.pid, 'SIGCONT');
    await vm.adopt(migrating);
    await vm.qemu!.qmp.execute('stop', undefined, { timeoutMs: QMP_RECOVERY_MS });
    vm.place = 'migrating-in';
    const j = journal();
    this.#awaitingAnswer.set(vm.name, { vm, epoch, migrationId, ...(j ? { journal: j } : {}) });
    log.warn('sidecar restarted during the completion handshake: guest paused until the source answers', {
      migrationId,
      finalEpoch: epoch,
    });
  }

  /**
   * The source's answer for a VM recovered by #recoverCompleting; known=false if none waits
   * for it, and never acted on when it names another migration than the one that waits (a
   * retried answer to an earlier migration of the VM: ERR_MIGRATION_ID_MISMATCH).
   */
  #answerRecovered(c: { vm: string; migrationId: string; outcome: 'completed' | 'rolled-back'; epoch: number }): ResolveAnswer {
    const { vm: name, outcome, epoch } = c;
    const w = this.#awaitingAnswer.get(name);
    if (!w) return { known: false, code: 'ERR_NO_MIGRATION', message: `VM ${name} is not migrating in to ${this.host.name}` };
    const stale = staleResolve(w.migrationId, c.migrationId);
    if (stale) {
      this.metrics.staleResolves.inc();
      this.log.warn('ignored an answer for another migration of this VM', {
        vm: name,
        migrationId: w.migrationId,
        answerFor: c.migrationId,
        outcome,
        epoch,
      });
      return stale;
    }
    if (outcome === 'completed' && epoch !== w.epoch) {
      return { known: false, code: 'ERR_NO_MIGRATION', message: `no completion request of final epoch ${epoch}` };
    }
    this.#awaitingAnswer.delete(name);
    const { vm, journal } = w;
    const log = this.log.child({ vm: name, migrationId: w.migrationId });
    void (async () => {
      if (outcome === 'completed') {
        // The rebuilt journal goes into the image (the log records the outcome first);
        // writes of the resumed guest wait for that, reads see the journal meanwhile.
        await journal?.markCompleted(epoch);
        journal?.passThrough();
        await vm.qemu!.qmp.execute('cont');
        vm.place = 'running';
        log.info('the source answered completed: the VM runs here', { finalEpoch: epoch });
        await journal?.drained();
        await closeAdoptedWindow(vm, log);
      } else {
        journal?.discard();
        await vm.killQemu();
        await vm.removeRam();
        vm.place = 'fenced';
        log.warn('the source answered rolled-back: fenced');
      }
      await vm.dropCompletingRecords(cleanupCrashPoint(this.#faults));
    })().catch((e) => log.error('acting on the source answer failed', { error: errorFields(e) }));
    return { known: true };
  }

  async #recoverSource(vm: VmInstance, pid: QemuIdentity | null, marker: MigrationMarker, log: Logger): Promise<void> {
    const { migrationId } = marker;
    // A persisted stage is re-applied whole: its disk extents too.
    const sink = vm.config.disk ? new ImageSink(vm.config.disk.image) : undefined;
    const store = new CheckpointStore({
      dir: vm.checkpointDir,
      ramPath: vm.ramFile,
      ramBytes: vm.ramBytes,
      ...(sink ? { disk: sink } : {}),
    });
    let last: { epoch: number; devstatePath: string } | null = null;
    try {
      const rep = await store.recover();
      last = store.lastApplied();
      log.info('checkpoint store recovered', { report: rep as unknown as Record<string, unknown>, epoch: last.epoch });
    } catch (e) {
      if (!isTetherError(e, 'ERR_CKPT_NOT_INITIALIZED')) throw e;
    } finally {
      await sink?.close();
    }
    if (last === null) {
      // Before switchover: the old QEMU still owns the VM.
      if (!pid) throw new TetherError('ERR_RECOVERY', 'no checkpoint and no QEMU: the VM is lost');
      await vm.adopt(pid);
      const q = vm.qemu!.qmp;
      await q.execute('migrate_cancel', undefined, { timeoutMs: QMP_RECOVERY_MS }).catch(() => {});
      for (let i = 0; i < 250; i++) {
        const m = (await q.execute('query-migrate', undefined, { timeoutMs: QMP_RECOVERY_MS })) as { status?: string };
        if (!['active', 'setup', 'cancelling', 'pre-switchover', 'device'].includes(m.status ?? '')) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      const st = (await q.execute('query-status')) as { status: string };
      if (st.status !== 'running') await q.execute('cont');
      vm.place = 'running';
      vm.lastMigration = { migrationId, outcome: 'rolled-back', reason: 'sidecar-restart', rollback: { epoch: null } };
      log.warn('migration interrupted before switchover by a sidecar restart: cancelled, VM kept', { migrationId });
      return;
    }
    if (pid) await killQemu(pid);
    await vm.restoreFrom(last.devstatePath);
    // NICs before the VM runs (and so before the announcement)
    await resumeRestored(vm, () => this.#openNics(vm, this.#createNics(vm, 'pass')));
    await announceRestored(vm);
    vm.place = 'running';
    vm.lastMigration = { migrationId, outcome: 'rolled-back', reason: 'sidecar-restart', rollback: { epoch: last.epoch } };
    this.metrics.rollbacks.inc({ reason: 'sidecar-restart' });
    log.warn('migration interrupted by a sidecar restart: resumed from the last applied checkpoint', { migrationId, epoch: last.epoch });
    // The destination may have asked to complete and be waiting, paused, for the answer.
    void notifyDestination({
      psk: this.host.peer.key,
      to: parseHostPort(marker.peer),
      migrationId,
      vm: vm.name,
      outcome: 'rolled-back',
      epoch: last.epoch,
      log,
      giveUpAfterMs: 10 * 60_000,
    });
  }

  /**
   * Stop serving and let go of every guest WITHOUT stopping it: a sidecar restart
   * (SIGTERM, SIGINT or SIGKILL alike) never takes a VM down; the next start adopts
   * each running QEMU. Stopping guests is an explicit command (`tether vm stop`).
   * An outgoing migration is left exactly as a dying sidecar leaves it (no rollback
   * now; recovery resolves it at the next start). An incoming one is fenced: its
   * guest is the copy the source rolls back from, never the only one.
   */
  async shutdown(): Promise<void> {
    this.#control?.close();
    this.#peer?.close();
    this.#http?.close();
    this.#http?.closeAllConnections();
    for (const m of this.#outgoing.values()) await m.detach().catch(() => {});
    for (const d of this.#incoming.values()) await d.fence('daemon-shutdown').catch(() => {});
    // QEMU's tap backends keep the guests' NICs; the TAPs stay in their bridges.
    for (const vm of this.vms.values()) {
      await vm.detachQemu().catch(() => {});
      await this.#closeNics(vm.name, false);
      await vm.stopDisk().catch(() => {});
    }
    // Requests still open (a `tether migrate` waiting) get their error line, then EOF.
    for (const s of this.#clients) s.end();
    await fs.rm(this.host.controlSocket, { force: true });
  }

  // ---- guest NICs ----

  /** NIC ports of `vm` (no I/O yet): their gates exist from here on. */
  #createNics(vm: VmInstance, mode: 'pass' | 'gated', relay = false): NicPort[] {
    const logOn = process.env.TETHER_GATE_LOG === '1';
    const ports = (vm.config.nics ?? []).map(
      (nic, i) =>
        new NicPort({
          vm: vm.name,
          index: i,
          nic,
          ...(relay
            ? {
                relay: vm.nicRelays[i]!,
                ...(this.#faults.relayPauseMs
                  ? {
                      pauseReading: {
                        ms: this.#faults.relayPauseMs,
                        epoch: this.#faults.relayPauseEpoch ?? 5,
                        ...(this.#faults.relayPauseBytes !== undefined ? { bytes: this.#faults.relayPauseBytes } : {}),
                      },
                    }
                  : {}),
                ...(this.#faults.relaySndbufDefault ? { keepQemuSndbuf: true } : {}),
              }
            : {}),
          mode,
          bounds: vm.config.gate ?? gateDefaults(gateReserve()),
          checkpointWindow: vm.config.checkpoint.window,
          counters: this.metrics.nicCounters(vm.name, `net${i}`),
          log: this.log.child({ vm: vm.name }),
          ...(logOn ? { releaseLogFile: path.join(vm.dir, `net${i}.gate.jsonl`) } : {}),
        }),
    );
    this.#nics.set(vm.name, ports);
    return ports;
  }

  /** Relays (a destination's window) connected to QEMU's sockets (QEMU must be started); nothing else to do. */
  async #openNics(vm: VmInstance, ports: NicPort[]): Promise<void> {
    for (const p of ports) await p.open(() => vm.qemu?.pid);
    await Promise.all(ports.map((p) => p.waitConnected(NIC_CONNECT_MS)));
    if (ports.length) vm.log.info('NICs connected', { nics: ports.map((p) => p.name) });
  }

  /** Let go of a VM whose recovery or adoption failed: detach its QEMU (never signalled), close its disk and NIC ports. */
  async #letGo(vm: VmInstance): Promise<void> {
    await vm.qemu?.detach().catch(() => {}); // a QMP connection already gone: nothing to detach
    vm.qemu = undefined;
    await vm.stopDisk().catch(() => {}); // the export may never have started
    await this.#closeNics(vm.name, false);
  }

  async #closeNics(vm: string, remove: boolean): Promise<void> {
    const ports = this.#nics.get(vm);
    if (!ports) return;
    this.#nics.delete(vm);
    for (const p of ports) await p.close(remove);
  }

  // ---- control socket (CLI) ----

  #serveControl(sock: net.Socket): void {
    const dec = new LineDecoder();
    this.#clients.add(sock);
    sock.on('close', () => this.#clients.delete(sock));
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
        if (this.#damaged.has(cfg.name)) {
          throw new TetherError(
            'ERR_STATE_FILE_CORRUPT',
            `VM ${cfg.name}'s record in ${path.join(this.host.stateDir, cfg.name)} is damaged; its QEMU may still run. ` +
              'Check, remove the directory, then start it',
          );
        }
        const existing = this.vms.get(cfg.name);
        if (existing) this.#settled(existing);
        if (existing && existing.place !== 'stopped' && existing.place !== 'gone' && existing.place !== 'fenced') {
          throw new TetherError('ERR_VM_EXISTS', `VM ${cfg.name} is already ${existing.place} on this host`);
        }
        const vm = new VmInstance(this.host, cfg, this.log);
        this.vms.set(cfg.name, vm);
        await this.#closeNics(vm.name, true);
        const ports = this.#createNics(vm, 'pass');
        try {
          for (const p of ports) await p.open(() => vm.qemu?.pid);
          await vm.boot();
          await Promise.all(ports.map((p) => p.waitConnected(NIC_CONNECT_MS)));
        } catch (e) {
          await vm.killQemu().catch(() => {});
          vm.place = 'stopped';
          await this.#closeNics(vm.name, true);
          throw e;
        }
        return this.#status(vm);
      }
      case 'vm.stop': {
        const vm = this.#settled(this.#vm(vmName()));
        if (this.#outgoing.has(vm.name)) throw new TetherError('ERR_VM_BUSY', `VM ${vm.name} is migrating; abort first`);
        vm.place = 'stopped';
        await vm.stopQemu();
        await this.#closeNics(vm.name, true);
        await vm.removeRam();
        return this.#status(vm);
      }
      case 'vm.forget':
        return this.#forget(vmName(), p.force === true);
      case 'vm.adopt':
        return this.#adoptByOperator(this.#vm(vmName()));
      case 'status': {
        if (p.vm === undefined) return { host: this.host.name, vms: [...this.vms.values()].map((v) => this.#status(v)) };
        const vm = this.#vm(vmName());
        return { ...this.#status(vm), ...(vm.config.disk ? { disk: await diskStatus(vm) } : {}) };
      }
      case 'migrate': {
        const vm = this.#settled(this.#vm(vmName()));
        if (typeof p.to !== 'string') throw new TetherError('ERR_USAGE', 'parameter to (host:port of the destination daemon) is required');
        const to = parseHostPort(p.to);
        if (vm.place !== 'running') throw new TetherError('ERR_VM_NOT_RUNNING', `VM ${vm.name} is ${vm.place}, not running`);
        if (this.#outgoing.has(vm.name)) throw new TetherError('ERR_VM_BUSY', `VM ${vm.name} is already migrating`);
        const mig = new SourceMigration({
          host: this.host,
          vm,
          to,
          onProgress: progress,
          metrics: this.metrics,
          faults: this.#faults,
        });
        this.#outgoing.set(vm.name, mig);
        vm.place = 'migrating-out';
        try {
          const result = await mig.run();
          vm.lastMigration = result as unknown as Record<string, unknown>;
          if (result.outcome === 'completed') {
            this.vms.delete(vm.name);
            await this.#closeNics(vm.name, true);
          }
          return result;
        } finally {
          this.#outgoing.delete(vm.name);
        }
      }
      case 'abort': {
        const name = vmName();
        // Optional `migration`: abort only that migration (an operator's abort typed while
        // looking at one migration must not stop the next one of the VM).
        if (p.migration !== undefined && !isMigrationId(p.migration)) {
          throw new TetherError('ERR_USAGE', 'parameter migration must be a migration id (as tether status shows it)');
        }
        const out = this.#outgoing.get(name);
        const inc = out ? undefined : this.#incoming.get(name);
        const current = out?.id ?? inc?.id;
        if (current !== undefined && p.migration !== undefined && p.migration !== current) {
          throw new TetherError(
            'ERR_MIGRATION_ID_MISMATCH',
            `VM ${name} is in migration ${current}, not ${String(p.migration)}: nothing aborted`,
          );
        }
        if (out) {
          out.abort('operator-abort');
          return { aborted: name, role: 'source', migrationId: out.id };
        }
        if (inc) {
          await inc.fence('operator-abort');
          return { aborted: name, role: 'destination', migrationId: inc.id };
        }
        throw new TetherError('ERR_NO_MIGRATION', `VM ${name} is not migrating on this host`);
      }
      default:
        throw new TetherError('ERR_USAGE', `unknown method ${req.method}`);
    }
  }

  /** `vm`, unless a restart has not finished recovering it (ERR_VM_RECOVERING) or left it unrecovered (ERR_VM_UNRECOVERED). */
  #settled(vm: VmInstance): VmInstance {
    if (vm.place === 'recovering') {
      throw new TetherError('ERR_VM_RECOVERING', `VM ${vm.name} is still being recovered after the sidecar restart; retry`, {
        vm: vm.name,
      });
    }
    if (vm.place === 'unrecovered') {
      const c = vm.unrecovered;
      throw new TetherError(
        'ERR_VM_UNRECOVERED',
        `VM ${vm.name} is unrecovered (${c ? `${c.code}: ${c.message}` : 'cause unknown'}); ` +
          'check its QEMU and the other host, then `tether vm adopt` or `tether vm forget` it',
        { vm: vm.name, cause: c ?? null },
      );
    }
    return vm;
  }

  /** Live QEMUs the VM's records name (vm.json, the marker, a standby), by pid + start time. */
  async #recordedQemus(vm: VmInstance): Promise<QemuIdentity[]> {
    const out: QemuIdentity[] = [];
    const add = (q: QemuIdentity | null | undefined): void => {
      if (q && identityAlive(q) && !out.some((o) => same(o, q))) out.push(q);
    };
    const saved = await VmInstance.readPersisted(vm.dir).catch(() => null);
    // a record of an older build (no start time): the operator checked; the pid as it runs now
    const legacy = (pid: number | null | undefined, st: string | null | undefined): QemuIdentity | null => {
      if (pid === null || pid === undefined) return null;
      const startTime = typeof st === 'string' ? st : procStartTime(pid);
      return startTime === null ? null : { pid, startTime };
    };
    add(legacy(saved?.pid, saved?.startTime));
    const marker = await VmInstance.readMarker(vm.dir).catch(() => null);
    add(legacy(marker?.qemuPid, marker?.qemuStartTime));
    add(await VmInstance.readStandby(vm.dir));
    return out;
  }

  /**
   * `tether vm forget <vm>`: drop this host's records of the VM (vm.json, marker, completion
   * request, unrecovered cause) and nothing else: no process is signalled, no RAM file, disk or
   * TAP is touched. Refused (ERR_VM_QEMU_ALIVE) while a QEMU the records name still runs,
   * unless `force` (it then runs on, unsupervised). For a VM that is not running here only.
   */
  async #forget(name: string, force: boolean): Promise<Record<string, unknown>> {
    const vm = this.vms.get(name);
    const dir = path.join(this.host.stateDir, name);
    if (!vm && !this.#damaged.has(name)) throw new TetherError('ERR_NO_SUCH_VM', `no VM named ${name} on host ${this.host.name}`);
    if (vm?.place === 'recovering') this.#settled(vm);
    if (vm && !['unrecovered', 'stopped', 'gone', 'fenced'].includes(vm.place)) {
      throw new TetherError('ERR_VM_BUSY', `VM ${name} is ${vm.place} here: stop it (tether vm stop) instead of forgetting it`);
    }
    let alive: QemuIdentity[] = [];
    if (vm) alive = await this.#recordedQemus(vm);
    if (!vm && !force) {
      throw new TetherError(
        'ERR_VM_QEMU_ALIVE',
        `VM ${name}'s record is damaged: whether a QEMU of it runs is unknown; check, then --force`,
        {
          vm: name,
          pids: [],
        },
      );
    }
    if (alive.length > 0 && !force) {
      throw new TetherError(
        'ERR_VM_QEMU_ALIVE',
        `VM ${name}: QEMU pid ${alive.map((q) => q.pid).join(', ')} started by this sidecar still runs; ` +
          'stop it yourself, or forget with --force to leave it running unsupervised',
        { vm: name, pids: alive.map((q) => q.pid) },
      );
    }
    for (const f of ['vm.json', 'migration.json', 'completing.json', 'unrecovered.json', 'standby.json']) {
      await fs.rm(path.join(dir, f), { force: true });
    }
    if (vm) {
      await vm.qemu?.detach().catch(() => {});
      await vm.stopDisk().catch(() => {});
      await this.#closeNics(name, false);
    }
    this.vms.delete(name);
    this.#damaged.delete(name);
    this.#awaitingAnswer.delete(name);
    this.log.warn('VM forgotten by the operator: its records are dropped, nothing else touched', {
      vm: name,
      leftRunning: alive.map((q) => q.pid),
    });
    return { vm: name, forgotten: true, leftRunning: alive.map((q) => q.pid) };
  }

  /**
   * `tether vm adopt <vm>`: the operator checked an unrecovered VM and accepts what runs. The
   * one live QEMU its records name becomes its QEMU (resumed and announced if it is paused:
   * the operator says this copy is the VM); with none, the VM is stopped. Two live QEMUs are
   * refused (ERR_VM_QEMU_ALIVE): the operator stops one first. The migration records go.
   */
  async #adoptByOperator(vm: VmInstance): Promise<Record<string, unknown>> {
    if (vm.place !== 'unrecovered') this.#settled(vm);
    if (vm.place !== 'unrecovered') throw new TetherError('ERR_USAGE', `VM ${vm.name} is ${vm.place}, not unrecovered: nothing to adopt`);
    const alive = await this.#recordedQemus(vm);
    if (alive.length > 1) {
      throw new TetherError(
        'ERR_VM_QEMU_ALIVE',
        `VM ${vm.name}: ${alive.length} QEMUs run (pids ${alive.map((q) => q.pid).join(', ')}); stop all but the VM's, then adopt`,
        { vm: vm.name, pids: alive.map((q) => q.pid) },
      );
    }
    const log = this.log.child({ vm: vm.name });
    vm.place = 'recovering';
    let resumed = false;
    try {
      if (alive.length === 1) {
        await vm.adopt(alive[0]!, QMP_RECOVERY_MS);
        await closeAdoptedWindow(vm, log);
        const { status } = await vm.qemu!.qmp.execute<{ status: string }>('query-status', undefined, { timeoutMs: QMP_RECOVERY_MS });
        if (status !== 'running') {
          await resumeRestored(vm, () => this.#openNics(vm, this.#createNics(vm, 'pass')));
          await announceRestored(vm);
          resumed = true;
        }
        vm.place = 'running';
        if (!this.#nics.has(vm.name)) await this.#openNics(vm, this.#createNics(vm, 'pass'));
      } else {
        vm.place = 'stopped';
      }
    } catch (e) {
      const err = e as TetherError;
      await this.#letGo(vm);
      vm.place = 'unrecovered';
      throw new TetherError(err.code ?? 'ERR_RECOVERY', `adopting VM ${vm.name} failed, it stays unrecovered: ${err.message}`, {
        vm: vm.name,
      });
    }
    await vm.setMigrationMarker(null);
    await fs.rm(path.join(vm.dir, 'completing.json'), { force: true });
    await vm.clearUnrecovered();
    this.#awaitingAnswer.delete(vm.name);
    log.warn('unrecovered VM adopted by the operator', { pid: alive[0]?.pid ?? null, resumed });
    return { ...this.#status(vm), adopted: alive[0]?.pid ?? null, resumed };
  }

  #vm(name: string): VmInstance {
    const vm = this.vms.get(name);
    if (!vm) throw new TetherError('ERR_NO_SUCH_VM', `no VM named ${name} on host ${this.host.name}`);
    return vm;
  }

  #status(vm: VmInstance): Record<string, unknown> {
    const out = this.#outgoing.get(vm.name);
    const inc = this.#incoming.get(vm.name);
    const awaiting = this.#awaitingAnswer.get(vm.name);
    return {
      vm: vm.name,
      host: this.host.name,
      state: vm.place,
      pid: vm.qemu && !vm.qemu.hasExited ? vm.qemu.pid : null,
      memoryMiB: vm.config.memoryMiB,
      serialLog: vm.serialLog,
      ramFile: vm.ramFile,
      migration: out
        ? { role: 'source', id: out.id, phase: out.phase.state, appliedEpoch: out.appliedEpoch }
        : inc
          ? { role: 'destination', id: inc.id, phase: inc.phase.state, ackedEpoch: inc.ackedEpoch }
          : awaiting
            ? { role: 'destination', id: awaiting.migrationId, phase: 'completing', finalEpoch: awaiting.epoch }
            : null,
      lastMigration: vm.lastMigration ?? null,
      ...(vm.place === 'unrecovered' ? { unrecovered: vm.unrecovered ?? null } : {}),
    };
  }

  // ---- peer port (incoming migrations) ----

  async #servePeer(sock: net.Socket): Promise<void> {
    sock.on('error', () => {});
    // Nobody unauthenticated makes this daemon allocate or act: at most maxUnauthenticated
    // connections handshake at once (more are closed at accept), each for at most
    // handshakeTimeoutMs, and before AUTH no frame may exceed the handshake's own size
    // (channel.ts, codec.ts HANDSHAKE_MAX_FRAME). Every refusal is counted.
    const cap = this.host.peer.maxUnauthenticated ?? PEER_DEFAULTS.maxUnauthenticated;
    if (this.#unauthenticated >= cap) {
      this.metrics.peerRefused.inc({ reason: 'unauthenticated_cap' });
      this.log.warn('peer connection refused: too many unauthenticated connections', { remote: sock.remoteAddress, cap });
      sock.destroy();
      return;
    }
    this.#unauthenticated++;
    let ch: PeerChannel;
    try {
      ch = await PeerChannel.accept(sock, {
        psk: this.host.peer.key,
        handshakeTimeoutMs: this.host.peer.handshakeTimeoutMs ?? PEER_DEFAULTS.handshakeTimeoutMs,
      });
    } catch (e) {
      this.metrics.peerRefused.inc({ reason: refusalReason(e) });
      this.log.warn('peer rejected', { remote: sock.remoteAddress, error: errorFields(e) });
      return;
    } finally {
      this.#unauthenticated--;
    }
    let dest: DestinationMigration | undefined;
    let answered = false;
    ch.on('close', (err) => dest?.onChannelClosed(err));
    ch.on('message', (m) => {
      if (dest) {
        dest.onMessage(m);
        return;
      }
      if (answered) return;
      try {
        if (m.type !== 'control') throw new TetherError('ERR_PEER_PROTOCOL', `expected prepare, got ${m.type}`);
        const c = asPeerControl(m.body);
        if (c.kind === 'resolve') {
          // The source's answer to a completion request, on a channel of its own (the
          // migration channel was lost): hand it to that incoming migration, confirm, and
          // let the source close.
          answered = true;
          const inc = this.#incoming.get(c.vm);
          // Either checks the migration id first: a stale answer (to an earlier migration of
          // the VM) is refused with ERR_MIGRATION_ID_MISMATCH and changes nothing.
          const a = inc ? inc.resolve(c) : this.#answerRecovered(c);
          this.log.info('completion answer from the source', {
            vm: c.vm,
            migrationId: c.migrationId,
            outcome: c.outcome,
            epoch: c.epoch,
            known: a.known,
            ...(a.known ? {} : { code: a.code, why: a.message }),
          });
          const body = { kind: 'resolved', migrationId: c.migrationId, known: a.known, ...(a.known ? {} : { code: a.code }) };
          ch.send({ type: 'control', body }).catch(() => {});
          setTimeout(() => ch.close(), 5000).unref();
          return;
        }
        if (c.kind !== 'prepare') throw new TetherError('ERR_PEER_PROTOCOL', `expected prepare, got ${c.kind}`);
        const cfg = this.#incomingConfig(c);
        // Checked and registered in this same synchronous step: a second prepare for the
        // name, even one racing on another connection, finds the first in #incoming.
        if (this.#incoming.has(cfg.name)) {
          throw new TetherError('ERR_PEER_VM_BUSY', `VM ${cfg.name} is already migrating in to ${this.host.name}`);
        }
        const existing = this.vms.get(cfg.name);
        if (this.#damaged.has(cfg.name)) {
          throw new TetherError('ERR_STATE_FILE_CORRUPT', `VM ${cfg.name}'s record on ${this.host.name} is damaged`);
        }
        if (existing) this.#settled(existing);
        if (existing && !['stopped', 'gone', 'fenced'].includes(existing.place)) {
          throw new TetherError('ERR_PEER_VM_BUSY', `VM ${cfg.name} is already ${existing.place} on ${this.host.name}`);
        }
        // The gates exist, gated, before the incoming QEMU is even started: the guest
        // can run here only after 'ready', and every frame it sends is held from then on.
        const gateMode = this.#faults.gateOpen ? 'pass' : 'gated';
        if (this.#faults.gateOpen) this.log.warn('fault injection: destination gate forced open', { vm: cfg.name });
        const probe = new VmInstance(this.host, cfg, this.log);
        const ports = this.#createNics(probe, gateMode, true);
        dest = new DestinationMigration({
          host: this.host,
          channel: ch,
          migrationId: c.migrationId,
          vmConfig: cfg,
          sendConfiguration: c.sendConfiguration,
          ...(c.window !== undefined ? { sourceWindow: c.window } : {}),
          log: this.log,
          faults: this.#faults,
          outputs: composeOutputs(ports.map((p) => p.gate)),
          onInstance: (vm) => this.vms.set(vm.name, vm),
          onStaleResolve: () => this.metrics.staleResolves.inc(),
          onQemuStarted: (vm) => this.#openNics(vm, ports),
          onCompleted: async (vm) => {
            const q = vm.qemu;
            if (!q) return;
            for (const p of ports) {
              const ms = await p.detach(q.qmp);
              this.metrics.relayDetachMs.set({ vm: vm.name, nic: p.name }, ms);
            }
          },
        });
        this.#incoming.set(cfg.name, dest);
        this.log.info('incoming migration accepted', { vm: cfg.name, migrationId: c.migrationId, from: ch.remote });
        const d = dest;
        void d.run();
        void d.done.promise.then(async (phase) => {
          if (phase === 'fenced') await this.#closeNics(cfg.name, true);
          this.#incoming.delete(cfg.name);
          this.metrics.migrations.inc({ role: 'destination', outcome: phase });
          this.log.info('incoming migration ended', { vm: cfg.name, migrationId: d.id, phase });
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

  /**
   * The destination's own config of the VM a `prepare` names: what QEMU will run
   * here comes from this host's vmConfigDir only, never from the peer. The peer's
   * device-model digest must match it, and this host's fence timeout must be
   * below the source's failover timeout (D stops before S resumes).
   */
  #incomingConfig(c: Extract<PeerControl, { kind: 'prepare' }>): VmConfig {
    const file = path.join(this.host.vmConfigDir, `${c.vm}.yaml`);
    let cfg: VmConfig;
    try {
      cfg = loadVmConfig(file);
    } catch (e) {
      if (isTetherError(e, 'ERR_CONFIG_READ') && e.details?.['errno'] === 'ENOENT') {
        throw new TetherError('ERR_PEER_UNKNOWN_VM', `host ${this.host.name} has no VM ${c.vm} (no ${file})`, { vm: c.vm });
      }
      const err = e as TetherError;
      throw new TetherError(err.code ?? 'ERR_PEER_UNKNOWN_VM', `host ${this.host.name}: config of VM ${c.vm}: ${err.message}`, {
        vm: c.vm,
      });
    }
    if (cfg.name !== c.vm) {
      throw new TetherError('ERR_PEER_UNKNOWN_VM', `host ${this.host.name}: ${file} describes VM ${cfg.name}, not ${c.vm}`, {
        vm: c.vm,
      });
    }
    if (deviceModelDigest(cfg) !== c.deviceModel) {
      throw new TetherError(
        'ERR_PEER_DEVICE_MODEL',
        `VM ${c.vm} has another device model on ${this.host.name} (${deviceModelText(cfg)}); both hosts' configs must agree`,
        { vm: c.vm, deviceModel: deviceModelText(cfg) },
      );
    }
    if (cfg.checkpoint.fenceTimeoutMs >= c.failoverTimeoutMs) {
      throw new TetherError(
        'ERR_PEER_TIMEOUTS',
        `VM ${c.vm}: fenceTimeoutMs ${cfg.checkpoint.fenceTimeoutMs} on ${this.host.name} is not below the source's ` +
          `failoverTimeoutMs ${c.failoverTimeoutMs}`,
        { vm: c.vm },
      );
    }
    return cfg;
  }
}

interface Pending {
  vm: VmInstance;
  saved: PersistedVm;
  dir: string;
  log: Logger;
}

const same = (a: QemuIdentity, b: QemuIdentity): boolean => a.pid === b.pid && a.startTime === b.startTime;

/**
 * The live QEMU the migration marker names (pid + start time), or null. A marker of an older
 * build names a pid only: taken as vm.json's QEMU when it is that pid (vm.json has its start
 * time), as gone when no such process exists, and refused (ERR_RECOVERY) otherwise.
 */
function markerQemu(marker: MigrationMarker | null, recorded: QemuIdentity | null): QemuIdentity | null {
  if (!marker || marker.qemuPid === null) return null;
  const pid = marker.qemuPid;
  let id: QemuIdentity | null;
  if (typeof marker.qemuStartTime === 'string') id = { pid, startTime: marker.qemuStartTime };
  else if (recorded?.pid === pid) id = recorded;
  else if (procStartTime(pid) === null) return null;
  else {
    throw new TetherError('ERR_RECOVERY', `the migration marker names QEMU pid ${pid} without its start time, and pid ${pid} runs`, {
      pid,
    });
  }
  return identityAlive(id) ? id : null;
}

/** SIGKILL a QEMU the records name (never a process that reused its pid) and wait until it is gone. */
async function killQemu(id: QemuIdentity): Promise<void> {
  if (!(await killIdentity(id))) throw new TetherError('ERR_RECOVERY', `QEMU pid ${id.pid} did not die`);
}

/** Bound on each QMP command of a recovery: one VM's silent QEMU must not hold the others. */
const QMP_RECOVERY_MS = 5000;

function listen(server: net.Server, opts: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) =>
      reject(new TetherError('ERR_LISTEN', `cannot listen on ${opts.path ?? `${opts.host}:${opts.port}`}: ${e.code ?? e.message}`)),
    );
    server.listen(opts, () => resolve());
  });
}

/** The metric label of a peer connection that failed its handshake. */
function refusalReason(e: unknown): string {
  if (!(e instanceof TetherError)) return 'handshake_error';
  if (e.code === 'ERR_PROTO_FRAME_TOO_LARGE') return 'frame_too_large';
  if (e.code === 'ERR_PEER_AUTH' || e.code === 'ERR_PROTO_BAD_AUTH') return 'auth_failed';
  if (e.code === 'ERR_PEER_HANDSHAKE' && e.details?.timeout !== undefined) return 'handshake_timeout';
  if (e.code === 'ERR_PEER_HANDSHAKE' && e.details?.closed === true) return 'closed';
  return 'handshake_error';
}

/**
 * Listen on a unix socket that is 0600 from the moment it exists: the umask is narrowed
 * around listen(), whose bind() runs synchronously inside the call (a chmod after listen
 * would leave a window in which any local user could connect and drive the daemon).
 */
function listenPrivate(server: net.Server, socketPath: string): Promise<void> {
  const old = process.umask(0o177);
  try {
    return listen(server, { path: socketPath });
  } finally {
    process.umask(old);
  }
}

export function parseHostPort(s: string): { host: string; port: number } {
  const m = /^(.+):(\d{1,5})$/.exec(s);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port < 1 || port > 65535) throw new TetherError('ERR_USAGE', `'${s}' is not host:port`);
  return { host: m[1]!.replace(/^\[(.*)\]$/, '$1'), port };
}

/**
 * An adopted QEMU that owns its VM but still reads its disk through this sidecar (its
 * sidecar died inside the window, after the source's `completed`): the journal it had died
 * with the sidecar, so the restarted one serves the image (VmInstance.adopt) only until the
 * switch to QEMU's own file node, done here. A failure leaves the disk on the sidecar.
 */
async function closeAdoptedWindow(vm: VmInstance, log: Logger): Promise<void> {
  if (!vm.nbd) return;
  await vm
    .detachDiskWindow()
    .catch((e) => log.error('closing the disk window of an adopted QEMU failed: the disk stays on the sidecar', { error: errorFields(e) }));
}

/**
 * A VM's disk as `tether status <vm>` shows it: `window` while the sidecar serves it (a
 * destination's post-copy window), and QEMU's own answer (query-named-block-nodes: node and
 * driver, e.g. disk0:raw, f0:file) while the VM simply runs here; null while it migrates,
 * so a status poll never adds a QMP command to a migration's. `journal`: the block-write
 * journal's figures while it serves the disk (mode, held bytes and its bound, peak, delays).
 */
async function diskStatus(
  vm: VmInstance,
): Promise<{ image: string; window: boolean; nodes: string[] | null; journal: ReturnType<BlockJournal['figures']> | null }> {
  const q = vm.qemu;
  let nodes: string[] | null = null;
  if (q && !q.hasExited && vm.place === 'running') {
    nodes = await q.qmp
      .execute<{ 'node-name'?: string; drv?: string }[]>('query-named-block-nodes', { flat: true }, { timeoutMs: 1000 })
      .then((list) => list.map((n) => `${n['node-name'] ?? '?'}:${n.drv ?? '?'}`))
      .catch(() => null);
  }
  // The destination's journal while its window is open (held bytes against its bound).
  const dev = vm.nbd?.device;
  const journal = dev instanceof BlockJournal ? dev.figures() : null;
  return { image: vm.config.disk!.image, window: vm.nbd !== undefined, nodes, journal };
}
