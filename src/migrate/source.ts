import { qmpTimeMs, type QmpTimestamp } from '../qmp/codec.ts';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { CheckpointAssembler } from '../checkpoint/assembler.ts';
import type { Checkpoint } from '../checkpoint/assembler.ts';
import type { Message } from '../peer/messages.ts';
import { PAGE_SIZE } from '../checkpoint/messages.ts';
import { CheckpointStore } from '../checkpoint/store.ts';
import type { AppliedCheckpoint } from '../checkpoint/store.ts';
import { ImageSink } from '../disk/image-sink.ts';
import type { HostConfig } from '../config/types.ts';
import { remoteError, TetherError } from '../errors.ts';
import { hashRamFile } from '../memory/ram.ts';
import type { TetherMetrics } from '../metrics/registry.ts';
import { PeerChannel } from '../peer/channel.ts';
import type { Logger } from '../util/log.ts';
import { errorFields } from '../util/log.ts';
import { StateMachine } from '../util/state.ts';
import { StreamingSummary } from '../util/summary.ts';
import { deferred, Nap, nowMs, sleep } from '../util/time.ts';
import { deviceModelDigest } from '../vm/device-model.ts';
import type { VmInstance } from '../vm/instance.ts';
import { newMigrationId } from '../epoch/id.ts';
import { asPeerControl } from '../peer/control.ts';
import { notifyDestination, resolveMessage } from './notify.ts';
import { cleanupCrashPoint, crashBeforeResume, CUT_COMPLETION, HOLD_ACKS_TRIGGER, MIGRATE_TRIGGER } from './faults.ts';
import type { Faults } from './faults.ts';
import type { PeerControl } from '../peer/control.ts';
import { round, summarize } from './result.ts';
import { HotStandby, untilCannotRun } from './standby.ts';
import { checkSourceWindow } from './window.ts';
import { checkMigrationUri } from './uri.ts';
import { StreamTls, streamPsk } from './stream-tls.ts';
import type { MigrationResult, RollbackFigures } from './result.ts';

export type SourcePhase =
  | 'connecting'
  | 'unreached'
  | 'refused'
  | 'precopy'
  | 'switchover'
  | 'postcopy'
  | 'completed'
  | 'rolling-back'
  | 'rolled-back'
  | 'failed'
  | 'continued-on-destination';

const TRANSITIONS: Record<SourcePhase, readonly SourcePhase[]> = {
  // unreached: no tether peer answered; refused: the destination refused `prepare`.
  // Either way nothing changed anywhere: an error, not a rollback.
  connecting: ['precopy', 'rolling-back', 'unreached', 'refused'],
  unreached: [],
  precopy: ['switchover', 'rolling-back'],
  switchover: ['postcopy', 'rolling-back'],
  postcopy: ['completed', 'rolling-back'],
  // continued-on-destination: the rollback could not restore here and the destination was
  // reachable: given up (recorded durably), the VM continues there.
  'rolling-back': ['rolled-back', 'failed', 'continued-on-destination'],
  'continued-on-destination': [],
  completed: [],
  'rolled-back': [],
  failed: [],
  refused: [],
};

/** Pages per HASHES message: 64 Ki pages = 512 KiB of hashes. */
const HASH_CHUNK_PAGES = 65536;
const HEARTBEAT_MS = 200;
const PROGRESS_MS = 500;
/**
 * QEMU max-bandwidth (bytes/s) while a TCG migration with `precopyMs: 0` waits for its
 * switchover: QEMU allows max-bandwidth / 10 bytes per 100 ms window, which the migration
 * setup's own bytes already exceed, so no RAM page goes before the stop (measured:
 * ram.transferred 0 at pre-switchover). The price: the migration thread sleeps out that
 * window before it sees migrate-start-postcopy, ~100 ms of pre-copy with the guest running.
 */
const PRECOPY_TRICKLE = 10;

/** How long an answer of 'rolled-back' is retried: a destination that asked to complete waits paused for it. */
const ROLLED_BACK_NOTIFY_MS = 10 * 60_000;

/**
 * Rollback reasons after which the destination cannot be asked anything: it ended the
 * migration itself (its ABORT: it fenced), the channel is gone, or it went silent. Restoring
 * here is then the only option, whether or not it can be proven first.
 */
const DESTINATION_GONE = new Set(['destination-abort', 'peer-channel-closed', 'lease-expired']);

export interface SourceOptions {
  host: HostConfig;
  metrics?: TetherMetrics;
  vm: VmInstance;
  to: { host: string; port: number };
  /** Fault injection (TETHER_FAULTS): cut-completion and hold-acks-* are read here. */
  faults?: Faults;
  onProgress?: (p: Record<string, unknown>) => void;
  /**
   * The VM's NIC ports: suspended before the rollback kills the old QEMU (no connection
   * while the restored QEMU loads its device state), resumed once it runs; resume()
   * resolves when they are connected again, so announce-self reaches the wire.
   */
  nics?: { suspend(): void; resume(): Promise<void> };
}

/**
 * The source side of one migration. Owns the decision to roll back: once
 * taken, no ACK is ever sent again, so the destination can never release an
 * output of an epoch after the checkpoint the VM resumes from.
 */
export class SourceMigration {
  readonly phase: StateMachine<SourcePhase>;
  /**
   * This migration's id (control.ts MIGRATION_ID_RE), chosen here and sent in `prepare`: every
   * answer and record about this migration names it, so none is taken for another of the VM.
   */
  readonly id = newMigrationId();
  /** The VM's logger, every line naming this migration. */
  readonly #log: Logger;
  readonly #opts: SourceOptions;
  #holdAcksUntil: number | undefined;
  /** The ACK hold's sleep (fault injection); a decision cuts it short. */
  #holdAcksNap = new Nap();
  readonly #vm: VmInstance;
  readonly #store: CheckpointStore;
  /** Where checkpoint DISK extents go: this side writes the shared image until completion. */
  readonly #diskSink: ImageSink | undefined;
  readonly #result = deferred<MigrationResult>();
  readonly #t0 = nowMs();
  #channel: PeerChannel | undefined;
  #assembler: CheckpointAssembler | undefined;
  #applyChain: Promise<void> = Promise.resolve();
  #lastHeard = nowMs();
  #decided = false;
  #timers: NodeJS.Timeout[] = [];
  #controlWaiters = new Map<string, (c: PeerControl) => void>();
  #switchoverAt: number | null = null;
  /** Set just before migrate-continue: from then on the source QEMU may have handed the VM over. */
  #continued = false;
  #appliedEpoch: number | null = null;
  /** The destination answered `prepare` with `ready`: from here on, its ABORT means roll back. */
  #ready = false;
  /** Final epoch once completion is recorded durably: from then on this side never rolls back. */
  #completedEpoch: number | null = null;
  /** Streaming: a long migration takes millions of checkpoints. */
  readonly #pauses = new StreamingSummary();
  readonly #ckptBytes = new StreamingSummary();
  #tracker: string | null = null;
  #lastPauseMs: number | null = null;
  /** A QEMU waiting (-incoming defer) to take over on rollback; see standby.ts. */
  #standby: HotStandby | undefined;
  /** After the decision to roll back: the destination ended the migration itself or the channel is gone. */
  #destinationGone = false;
  /** A NACK for a bad checkpoint, sent with the ABORT that fences the destination (not before). */
  #nack: Message | undefined;
  /** The ABORT went out (or the channel was closed): the destination fences. */
  #fenced = false;
  /** TLS credentials of the migration stream on this QEMU (stream-tls.ts). */
  #tls: StreamTls | undefined;

  constructor(opts: SourceOptions) {
    this.#opts = opts;
    this.#vm = opts.vm;
    this.#log = this.#vm.log.child({ migrationId: this.id });
    this.phase = new StateMachine<SourcePhase>('migration', 'connecting', TRANSITIONS, this.#log);
    const f = opts.faults ?? {};
    const failEpoch = f.failApplySticky ?? f.failApplyEpoch;
    const disk = this.#vm.config.disk;
    this.#diskSink = disk ? new ImageSink(disk.image) : undefined;
    this.#store = new CheckpointStore({
      dir: this.#vm.checkpointDir,
      ramPath: this.#vm.ramFile,
      ramBytes: this.#vm.ramBytes,
      ...(failEpoch !== undefined ? { failPages: { epoch: failEpoch, sticky: f.failApplySticky !== undefined } } : {}),
      ...(this.#diskSink ? { disk: this.#diskSink } : {}),
    });
  }

  get appliedEpoch(): number | null {
    return this.#appliedEpoch;
  }

  /**
   * Runs the migration to its outcome. Failures become a rollback or a 'failed' result; it
   * rejects only when no tether peer was reached (refused, unreachable, failed handshake) or
   * the destination refused `prepare` (unknown VM, other device model, busy): nothing
   * changed on either host then, the VM runs here as before, and the cause is the error.
   */
  run(): Promise<MigrationResult> {
    this.#setup().catch((e) => this.rollback('setup-failed', e));
    return this.#result.promise;
  }

  /**
   * Sidecar shutdown (SIGTERM/SIGINT): take no decision, as if the sidecar had died.
   * No ACK is sent any more (the channel closes, so D fences itself), nothing is rolled
   * back or stopped, and the migration marker stays: the restarted sidecar resolves the
   * migration from what is on disk (recovery), exactly as after SIGKILL. A checkpoint
   * being applied is finished first (not acked); a rollback or completion already under
   * way is let run to its end. run() then rejects with ERR_DAEMON_SHUTDOWN.
   */
  async detach(): Promise<void> {
    if (this.#decided) {
      await Promise.race([this.#result.promise.catch(() => {}), sleep(30_000)]);
      return;
    }
    this.#decided = true;
    this.#stopTimers();
    this.#log.warn('sidecar shutting down mid-migration: left for recovery at the next start', { phase: this.phase.state });
    await this.#applyChain;
    this.#channel?.close();
    this.#result.reject(
      new TetherError('ERR_DAEMON_SHUTDOWN', `the sidecar stopped during the migration of ${this.#vm.name}; its next start resolves it`),
    );
  }

  /** Operator abort (or any caller-side reason): roll back now. */
  abort(reason = 'operator-abort'): void {
    void this.rollback(reason, undefined, 0);
  }

  async #setup(): Promise<void> {
    const vm = this.#vm;
    const qemu = vm.qemu;
    if (!qemu || qemu.hasExited) throw new TetherError('ERR_VM_NOT_RUNNING', `VM ${vm.name} has no running QEMU`);
    // Before switchover the VM dies with it; in post-copy the destination can no
    // longer fetch the pages it lacks. Either way: resume from the last checkpoint.
    qemu.exited.then(() => {
      if (!this.#decided && !this.phase.is('completed')) {
        void this.rollback('source-qemu-exited', new TetherError('ERR_SOURCE_QEMU_EXITED', 'source QEMU exited'));
      }
    });
    // Every page of the RAM file allocated before anything starts: a checkpoint's page writes
    // then never need room on the tmpfs, so a tmpfs that runs full (another VM growing) cannot
    // half-apply a checkpoint. Refused here, with nothing changed, when the room is not there.
    try {
      await allocateRamFile(vm.ramFile, vm.ramBytes);
    } catch (e) {
      await this.#refused(
        new TetherError('ERR_CKPT_RAM_RESERVE', `cannot allocate ${vm.ramFile} (${vm.ramBytes} bytes): ${(e as Error).message}`),
      );
      return;
    }
    // Old checkpoints go before the marker appears: a sidecar restarted in between must
    // never find a marker next to a previous migration's applied record.
    await fs.rm(vm.checkpointDir, { recursive: true, force: true });
    await vm.setMigrationMarker({
      role: 'source',
      migrationId: this.id,
      qemuPid: qemu.pid,
      peer: `${this.#opts.to.host}:${this.#opts.to.port}`,
      startedAt: new Date().toISOString(),
    });
    await fs.mkdir(vm.checkpointDir, { recursive: true, mode: 0o700 });

    let ch: PeerChannel;
    try {
      ch = await PeerChannel.connect(this.#opts.to.host, this.#opts.to.port, { psk: this.#opts.host.peer.key });
    } catch (e) {
      await this.#unreached(e);
      return;
    }
    this.#channel = ch;
    ch.on('message', (m) => this.#onMessage(m));
    ch.on('close', (err) => {
      if (this.#decided) this.#destinationGone = true;
      else if (!this.phase.is('completed')) void this.rollback('peer-channel-closed', err);
    });
    ch.start();
    if (ch.closed) throw new TetherError('ERR_PEER_CLOSED', 'peer closed the channel right after the handshake');

    // D runs QEMU from its own config of this VM: only the name and the device-model digest travel.
    await ch.send({
      type: 'control',
      body: {
        kind: 'prepare',
        migrationId: this.id,
        vm: vm.name,
        deviceModel: deviceModelDigest(vm.config),
        sendConfiguration: vm.sendConfiguration,
        failoverTimeoutMs: vm.config.checkpoint.failoverTimeoutMs,
        window: vm.config.checkpoint.window,
      },
    });
    // The hot standby starts while D starts its QEMU, so that neither QEMU's start (~170 ms
    // of CPU) competes with the switchover; it stays idle until a rollback.
    if (vm.config.migration.hotStandby && !this.#decided) this.#standby = HotStandby.start(vm);
    const ready = await this.#waitControl('ready', 60_000);
    if (ready.kind !== 'ready') throw new Error('unreachable');
    // Never execute what the peer names: only tcp:<the address this channel reached>:<port>,
    // rebuilt here (uri.ts). Anything else is refused before any QMP command.
    let uri: string;
    try {
      uri = checkMigrationUri(ready.uri, ch.remoteAddress);
    } catch (e) {
      await this.#refused(e as TetherError, { tellDestination: true });
      return;
    }
    this.#log.info('destination ready', { uri });
    this.#progress({ phase: 'precopy', destination: uri });

    const qmp = qemu.qmp;
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'postcopy-ram', state: true },
        { capability: 'pause-before-switchover', state: true },
        // MIGRATION events: the pause before switchover is seen at once, not at the next poll
        { capability: 'events', state: true },
      ],
    });
    const bw = vm.config.migration.maxBandwidth;
    const params: Record<string, number> = bw > 0 ? { 'max-bandwidth': bw, 'max-postcopy-bandwidth': bw } : {};
    // No pre-copy wanted, under TCG: let QEMU send no RAM before the switchover. QEMU before
    // 9.0 loses, under TCG, the dirty bit of a page the guest rewrites after pre-copy sent it
    // (upstream fix 03bfc2188f, see docs/design.md), and such a page would reach the
    // destination stale. Post-copy then runs at max-postcopy-bandwidth (0 = unlimited).
    if (vm.config.migration.precopyMs === 0 && vm.config.qemu.accel === 'tcg') params['max-bandwidth'] = PRECOPY_TRICKLE;
    if (Object.keys(params).length > 0) await qmp.execute('migrate-set-parameters', params);
    // The stream is TLS with this migration's key: the destination's QEMU refuses it otherwise.
    if (!this.#opts.faults?.plainStream) {
      this.#tls = await StreamTls.setUp({
        qmp,
        vmDir: vm.dir,
        endpoint: 'client',
        psk: streamPsk(this.#opts.host.peer.key, this.id),
        log: this.#log,
      });
    } else this.#log.warn('fault injection: the migration stream goes without TLS');
    if (this.#opts.faults?.holdMigrateTrigger) {
      this.#log.warn('fault injection: migrate waits for its trigger file');
      while (!this.#decided && !existsSync(path.join(vm.dir, MIGRATE_TRIGGER))) await sleep(50);
      if (this.#decided) return;
    }
    this.phase.to('precopy');
    await qmp.execute('migrate', { uri });
    this.#every(PROGRESS_MS, () => void this.#reportProgress());

    await sleep(vm.config.migration.precopyMs);
    if (this.#decided) return;
    // QEMU's own time of the stop that starts the switchover blackout (QMP event timestamp).
    let qemuStopAt: number | undefined;
    let precopyBytes: number | undefined;
    const onStop = (name: string, _d: unknown, ts: QmpTimestamp | undefined) => {
      if (name === 'STOP' && qemuStopAt === undefined && ts) qemuStopAt = qmpTimeMs(ts);
    };
    qmp.on('event', onStop);
    try {
      await qmp.execute('migrate-start-postcopy');
      precopyBytes = (await this.#waitMigrationStatus('pre-switchover')).ram?.transferred;
    } finally {
      qmp.off('event', onStop);
    }
    if (this.#decided) return;
    this.phase.to('switchover', {
      ...(qemuStopAt === undefined ? {} : { qemuStopAt }),
      ...(precopyBytes === undefined ? {} : { precopyBytes }),
    });
    // Checkpoint 0: the source's own state, saved while paused before switchover.
    const tmp = path.join(vm.dir, 'checkpoint0.devstate.tmp');
    await qmp.execute('xen-save-devices-state', { filename: tmp, live: false });
    const dev0 = await fs.readFile(tmp);
    await fs.rm(tmp, { force: true });
    await this.#store.init0(dev0);
    this.#appliedEpoch = 0;
    if (this.#decided) return;
    this.#continued = true;
    await qmp.execute('migrate-continue', { state: 'pre-switchover' });
    this.#switchoverAt = nowMs();
    this.#lastHeard = nowMs();
    this.phase.to('postcopy');
    this.#progress({ phase: 'postcopy', appliedEpoch: 0 });
    this.#every(100, () => this.#checkLease());
    this.#every(HEARTBEAT_MS, () => {
      if (!this.#decided && !ch.closed) ch.send({ type: 'heartbeat', epoch: this.#appliedEpoch ?? 0, sentAt: Date.now() }).catch(() => {});
    });

    // The destination's baseline: a hash per page of the RAM file as of checkpoint 0.
    // The RAM file is frozen now (QEMU is past switchover; only checkpoint pages change it).
    const pages = vm.ramBytes / PAGE_SIZE;
    const table = await hashRamFile(vm.ramFile, vm.ramBytes, { threads: vm.config.checkpoint.hashThreads });
    for (let start = 0; start < pages; start += HASH_CHUNK_PAGES) {
      const n = Math.min(HASH_CHUNK_PAGES, pages - start);
      await ch.send({ type: 'hashes', startPfn: start, hashes: table.subarray(start * 8, (start + n) * 8) });
    }
    await ch.send({ type: 'control', body: { kind: 'hashes-done', pages } });
  }

  #onMessage(m: Message): void {
    this.#lastHeard = nowMs();
    switch (m.type) {
      case 'begin':
      case 'pages':
      case 'disk':
      case 'diskzero':
      case 'devstate':
      case 'commit':
        this.#onCheckpointMessage(m);
        return;
      case 'heartbeat':
        return;
      case 'control': {
        let c: PeerControl;
        try {
          c = asPeerControl(m.body);
        } catch (e) {
          void this.rollback('bad-control-message', e);
          return;
        }
        if (c.kind === 'epoch-stats') {
          this.#pauses.add(c.pauseMs);
          this.#opts.metrics?.pause.observe(c.pauseMs / 1000);
          this.#lastPauseMs = c.pauseMs;
          this.#tracker = c.tracker;
        } else if (c.kind === 'complete') {
          if (c.migrationId !== this.id) {
            // Only this migration's destination speaks on this channel: anything else is a protocol fault.
            void this.rollback(
              'bad-control-message',
              new TetherError('ERR_MIGRATION_ID_MISMATCH', `completion request for migration ${c.migrationId}, not ${this.id}`),
            );
            return;
          }
          void this.#onCompleteRequest(c.finalEpoch);
        } else if (c.kind === 'ready') {
          this.#ready = true;
        }
        const w = this.#controlWaiters.get(c.kind);
        if (w) {
          this.#controlWaiters.delete(c.kind);
          w(c);
        }
        return;
      }
      case 'abort':
        // After the decision: the destination gave up by itself (it fenced), nobody to ask any more.
        if (this.#decided) this.#destinationGone = true;
        if (!this.#ready) void this.#refused(remoteError(m.code, m.reason));
        else void this.rollback('destination-abort', remoteError(m.code, m.reason), 0);
        return;
      default:
        this.#log.warn('unexpected message from destination', { type: m.type });
    }
  }

  #onCheckpointMessage(m: Message): void {
    if (this.#decided) return;
    if (this.#appliedEpoch === null) {
      void this.rollback('protocol', new TetherError('ERR_CKPT_SEQUENCE', 'checkpoint before checkpoint 0 was recorded'));
      return;
    }
    this.#assembler ??= new CheckpointAssembler({
      ramPages: this.#vm.ramBytes / PAGE_SIZE,
      // Every page, one epoch of journaled disk writes (its bound plus what QEMU had in
      // flight when the barrier admitted it), device state.
      maxCheckpointBytes:
        this.#vm.ramBytes + (this.#vm.config.disk ? this.#vm.config.disk.journalMaxBytes + 64 * 1024 * 1024 : 0) + 64 * 1024 * 1024,
      expectEpoch: 1,
    });
    let ckpt: Checkpoint | null;
    try {
      // D keeps at most `window` checkpoints unacknowledged (window.ts).
      if (m.type === 'begin') checkSourceWindow(m.epoch, this.#appliedEpoch, this.#vm.config.checkpoint.window);
      ckpt = this.#assembler.accept(m as never);
    } catch (e) {
      const err = e as TetherError;
      // Sent with the ABORT once this side knows it can restore: a NACK fences the destination.
      this.#nack = { type: 'nack', epoch: 'epoch' in m ? m.epoch : -1, code: err.code ?? 'ERR_CKPT', message: err.message };
      void this.rollback('bad-checkpoint', e);
      return;
    }
    if (!ckpt) return;
    const c = ckpt;
    this.#applyChain = this.#applyChain.then(() => this.#apply(c));
  }

  async #apply(ckpt: Checkpoint): Promise<void> {
    if (this.#decided) return;
    const t0 = nowMs();
    try {
      await this.#store.apply(ckpt);
      this.#log.debug('checkpoint applied', { epoch: ckpt.epoch, pages: ckpt.pfns.length, applyMs: +(nowMs() - t0).toFixed(2) });
    } catch (e) {
      void this.rollback('apply-failed', e);
      return;
    }
    this.#appliedEpoch = ckpt.epoch;
    const bytes = ckpt.data.length + ckpt.devstate.length + ckpt.disk.reduce((s, d) => s + (d.zero ? 0 : d.data.length), 0);
    this.#ckptBytes.add(bytes);
    this.#opts.metrics?.checkpointsApplied.inc();
    this.#opts.metrics?.checkpointBytes.inc({}, bytes);
    const f = this.#opts.faults;
    if (
      f?.holdAcksMs &&
      ckpt.epoch >= (f.holdAcksEpoch ?? 3) &&
      (this.#holdAcksUntil !== undefined || !f.holdAcksTrigger || existsSync(path.join(this.#vm.dir, HOLD_ACKS_TRIGGER)))
    ) {
      // Fault injection: one hold, armed by the first checkpoint it applies to. D takes
      // checkpoints up to its window, then waits for this ACK; its guest runs on, all
      // output held. Later checkpoints wait behind this one (applies run in order).
      this.#holdAcksUntil ??= nowMs() + f.holdAcksMs;
      const wait = this.#holdAcksUntil - nowMs();
      if (wait > 0) {
        this.#log.warn('fault injection: holding ACK', { epoch: ckpt.epoch, ms: Math.round(wait) });
        await this.#holdAcksNap.nap(wait);
      }
    }
    // Never ack once the rollback is decided: D must not release this epoch's outputs.
    if (this.#decided) return;
    await this.#channel?.send({ type: 'ack', epoch: ckpt.epoch }).catch(() => {});
  }

  #checkLease(): void {
    if (this.#decided) return;
    const silent = nowMs() - this.#lastHeard;
    if (silent > this.#vm.config.checkpoint.failoverTimeoutMs) {
      void this.rollback(
        'lease-expired',
        new TetherError('ERR_LEASE_EXPIRED', `nothing heard from the destination for ${Math.round(silent)} ms`),
      );
    }
  }

  /**
   * The destination asks to own the VM (docs/completion.md). Recording completion durably is
   * the commit point: before it this side may still roll back, after it never. The answer goes
   * out only after the record is on stable storage, and is repeated until the destination
   * confirms it, on a new channel if the migration channel is gone.
   */
  async #onCompleteRequest(finalEpoch: number): Promise<void> {
    await this.#applyChain;
    if (this.#completedEpoch !== null) {
      // asked again: the answer was lost and the channel survived
      this.#channel?.send(resolveMessage(this.id, this.#vm.name, 'completed', this.#completedEpoch)).catch(() => {});
      return;
    }
    if (this.#decided) return; // rolling back: the ABORT (and a resolve on a new channel) answer it
    const faults = this.#opts.faults ?? {};
    if (faults.cutCompletion === CUT_COMPLETION.beforeRecord) {
      this.#log.warn('fault injection: dropping the channel before recording completion', { finalEpoch });
      this.#channel?.close();
      return;
    }
    this.#decided = true;
    this.#stopTimers();
    try {
      await this.#store.recordCompleted(finalEpoch);
    } catch (e) {
      // Not recorded (a wrong final epoch, or I/O): the VM is still ours to resume.
      await this.#rollbackDecided('completion-refused', e, 0);
      return;
    }
    this.#completedEpoch = finalEpoch;
    // The VM is the destination's now: a standby must never run it here.
    await this.#standby?.discard();
    this.phase.to('completed', { finalEpoch });
    this.#vm.place = 'gone';
    if (faults.cutCompletion === CUT_COMPLETION.afterRecord) {
      this.#log.warn('fault injection: dropping the channel after recording completion', { finalEpoch });
      this.#channel?.close();
    } else if (faults.cutCompletion === CUT_COMPLETION.crashAfterRecord) {
      this.#log.warn('fault injection: sidecar dies after recording completion', { finalEpoch });
      process.kill(process.pid, 'SIGKILL');
    }
    const confirmed = notifyDestination({
      psk: this.#opts.host.peer.key,
      to: this.#opts.to,
      migrationId: this.id,
      vm: this.#vm.name,
      outcome: 'completed',
      epoch: finalEpoch,
      log: this.#log,
      ...(this.#channel ? { channel: this.#channel } : {}),
    });
    // The outcome is decided; `tether migrate` waits a little for the hand-over to be confirmed.
    const answer = await Promise.race([confirmed, sleep(this.#vm.config.checkpoint.failoverTimeoutMs).then(() => 'pending' as const)]);
    this.#channel?.close();
    // The VM lives on the destination now; the source's copy is dropped. The completion
    // record (and the marker naming the destination) stays until the destination confirmed:
    // a restarted sidecar then answers again instead of resuming the VM here.
    await this.#vm.stopQemu().catch(() => {});
    await fs.rm(this.#vm.ramFile, { force: true }).catch(() => {});
    const cleanup = () => this.#vm.dropCompletedSource(cleanupCrashPoint(faults)).catch(() => {});
    if (answer === 'pending') void confirmed.then(cleanup);
    else await cleanup();
    this.#finish({ outcome: 'completed', handover: answer });
  }

  /**
   * The destination refused `prepare`, or this side refused the destination's answer to it
   * (`tellDestination`: a migration URI it will not use; D is told with an ABORT naming the
   * code, so it does not wait for a stream): QEMU was never asked to migrate, so the VM
   * simply goes on running here; the refusal (a typed error) is the result.
   */
  async #refused(err: TetherError, opts: { tellDestination?: boolean } = {}): Promise<void> {
    if (this.#decided) return;
    this.#decided = true;
    this.#stopTimers();
    this.#log.warn(
      opts.tellDestination ? "destination's answer refused; nothing was started" : 'destination refused the migration; nothing was started',
      {
        error: errorFields(err),
      },
    );
    await this.#standby?.discard();
    this.phase.to('refused', { code: err.code });
    const ch = this.#channel;
    if (opts.tellDestination && ch && !ch.closed) {
      await Promise.race([ch.send({ type: 'abort', code: err.code, reason: err.message }).catch(() => {}), sleep(200)]);
    }
    ch?.close();
    for (const w of this.#controlWaiters.values()) w({ kind: 'hashes-done', pages: -1 });
    this.#controlWaiters.clear();
    this.#vm.place = 'running';
    await this.#vm.setMigrationMarker(null).catch(() => {});
    await fs.rm(this.#vm.checkpointDir, { recursive: true, force: true }).catch(() => {});
    this.#opts.metrics?.migrations.inc({ role: 'source', outcome: 'refused' });
    this.#result.reject(err);
  }

  /**
   * Resume the VM on the source from the last applied checkpoint. `detectMs`
   * is how long the failure took to notice (defaults to the silence since the
   * destination's last message).
   */
  async rollback(reason: string, err?: unknown, detectMs?: number): Promise<void> {
    if (this.#decided) return;
    this.#decided = true;
    await this.#rollbackDecided(reason, err, detectMs);
  }

  async #rollbackDecided(reason: string, err?: unknown, detectMs?: number): Promise<void> {
    const tDecide = nowMs();
    const detect = detectMs ?? tDecide - this.#lastHeard;
    this.#stopTimers();
    const vm = this.#vm;
    this.#log.warn('rolling back', { reason, ...(err ? { error: errorFields(err) } : {}) });
    this.phase.to('rolling-back', { reason });
    vm.place = 'rolling-back';
    this.#progress({ phase: 'rolling-back', reason });
    for (const w of this.#controlWaiters.values()) w({ kind: 'hashes-done', pages: -1 });
    this.#controlWaiters.clear();
    if (DESTINATION_GONE.has(reason)) this.#destinationGone = true;
    const ch = this.#channel;
    // Restore before fence (docs/design.md): past switchover, a destination this side can
    // reach is told to hold — keep its VM, hold every output, fence on nothing but this
    // side's word — and kept alive by heartbeats while this side proves it can restore.
    if (this.#continued && !this.#destinationGone && ch && !ch.closed) {
      await ch.send({ type: 'control', body: { kind: 'hold', migrationId: this.id } }).catch(() => {});
      this.#every(HEARTBEAT_MS, () => {
        if (!ch.closed && !this.#fenced) ch.send({ type: 'heartbeat', epoch: this.#appliedEpoch ?? 0, sentAt: Date.now() }).catch(() => {});
      });
    } else if (!this.#continued) {
      await this.#fenceDestination(reason);
    }

    const figures: RollbackFigures = { reason, epoch: null, detectMs: round(detect), restoreMs: 0, killMs: 0, startMs: 0, announceMs: 0 };
    let tRestored: number | null = null;
    try {
      if (!this.#continued) {
        // Before switchover the source QEMU still owns the VM: cancel and carry on.
        await this.#cancelPrecopy();
      } else {
        let last: AppliedCheckpoint;
        try {
          const proof = await this.#proveRestorable();
          last = proof.last;
          // No standby could load it: with the destination gone, the cold path (a fresh QEMU
          // after the kill) is still worth its try; with it reachable, that is no proof.
          if (proof.standbyError !== undefined && !this.#destinationGone && ch && !ch.closed) throw proof.standbyError;
        } catch (e) {
          if (this.#destinationGone || !ch || ch.closed) throw e;
          // It cannot be restored here, and the destination still runs the VM, all outputs
          // held: give the rollback up instead of losing the VM on both hosts.
          await this.#giveUp(reason, e);
          return;
        }
        figures.epoch = last.epoch;
        // Only now: the destination stops its VM and drops what it holds.
        await this.#fenceDestination(reason);
        const t1 = nowMs();
        this.#opts.nics?.suspend();
        const exited = vm.killQemu();
        const loaded = this.#standby?.loaded ?? false;
        // A loaded standby may take over while the old QEMU's teardown finishes, once that can no longer run.
        await (loaded ? untilCannotRun(vm.qemu, exited) : exited);
        const t2 = nowMs();
        figures.hot = loaded;
        if (loaded) {
          await this.#standby!.takeOver();
          crashBeforeResume(this.#opts.faults, this.#log);
          await resumeRestored(vm, () => this.#opts.nics?.resume());
        } else {
          await exited;
          await vm.restoreFrom(last.devstatePath);
          crashBeforeResume(this.#opts.faults, this.#log);
          await resumeRestored(vm, () => this.#opts.nics?.resume());
        }
        const t3 = nowMs();
        await announceRestored(vm);
        const t4 = nowMs();
        tRestored = t4;
        await exited; // the old QEMU's teardown may outlast the restore; not counted in it
        figures.killMs = round(t2 - t1);
        figures.startMs = round(t3 - t2);
        figures.announceMs = round(t4 - t3);
      }
      figures.restoreMs = round((tRestored ?? nowMs()) - tDecide);
      vm.place = 'running';
      this.phase.to('rolled-back', { epoch: figures.epoch, restoreMs: figures.restoreMs });
      if (this.#continued) {
        // A destination that asked to complete waits, paused, for an answer: if the ABORT
        // did not reach it, tell it on a new channel (it answers known=false if it fenced).
        void notifyDestination({
          psk: this.#opts.host.peer.key,
          to: this.#opts.to,
          migrationId: this.id,
          vm: vm.name,
          outcome: 'rolled-back',
          epoch: figures.epoch ?? 0,
          log: this.#log,
          giveUpAfterMs: ROLLED_BACK_NOTIFY_MS,
        });
      }
      this.#finish({ outcome: 'rolled-back', reason, err, rollback: figures });
    } catch (e) {
      this.#log.error('rollback failed: the VM is not running', { error: errorFields(e) });
      await this.#fenceDestination(reason);
      // never leave the wedged source QEMU (or a half-restored one) behind a 'failed'
      await vm.killQemu().catch(() => {});
      vm.place = 'stopped';
      this.phase.to('failed');
      this.#finish({ outcome: 'failed', reason, err: e, rollback: figures });
    }
  }

  /**
   * Everything that can show, while the destination may still run the VM, that this side can
   * resume it: applies settle (the one under way completes, unacked), a half-applied checkpoint
   * is finished from its stage, the applied record and its device-state file verify from disk,
   * and — with the hot standby — a standby QEMU has loaded that device state and waits paused
   * (a fresh one is started if the first is gone). Throws ERR_CKPT_HALF_APPLIED or
   * ERR_CKPT_*_CORRUPT when the checkpoint is not whole; returns the standby's failure
   * (ERR_RESTORE_UNAVAILABLE) as `standbyError`.
   */
  async #proveRestorable(): Promise<{ last: AppliedCheckpoint; standbyError?: unknown }> {
    await this.#applyChain; // an apply under way completes (but is not acked)
    // A failed apply may have left part of its checkpoint in the RAM file: finish it from
    // the persisted stage, or fail (ERR_CKPT_HALF_APPLIED) rather than resume mixed state.
    await this.#store.repair();
    const last = await this.#store.verifyApplied();
    if (!this.#vm.config.migration.hotStandby) return { last }; // the cold path starts its QEMU after the kill
    const sb = this.#standby;
    // fault injection: a device-state file QEMU refuses ("not a migration stream"), so the
    // load itself fails in QEMU
    let devstate = last.devstatePath;
    if (this.#opts.faults?.failRestoreLoad) {
      devstate = `${last.devstatePath}.fault`;
      await fs.writeFile(devstate, 'fault injection: not a migration stream\n');
    }
    try {
      if (!sb) throw new TetherError('ERR_RESTORE_UNAVAILABLE', 'no hot standby was started');
      await sb.load(devstate);
    } catch (e) {
      this.#log.warn('hot standby unusable: starting another one to load the device state', { error: errorFields(e) });
      await sb?.discard();
      this.#standby = HotStandby.start(this.#vm);
      try {
        await this.#standby.load(devstate);
      } catch (e2) {
        return { last, standbyError: e2 };
      }
    }
    return { last };
  }

  /** Tell the destination to fence (NACK first if a checkpoint was bad, then ABORT) and close. Idempotent. */
  async #fenceDestination(reason: string): Promise<void> {
    if (this.#fenced) return;
    this.#fenced = true;
    this.#stopTimers();
    const ch = this.#channel;
    if (ch && !ch.closed) {
      if (this.#nack) await Promise.race([ch.send(this.#nack).catch(() => {}), sleep(200)]);
      await Promise.race([ch.send({ type: 'abort', code: 'ERR_ROLLBACK', reason }).catch(() => {}), sleep(200)]);
      ch.close();
    }
  }

  /**
   * The rollback cannot be carried out here (`cause`) while the destination runs the VM, all
   * its outputs held: the VM stays there. The destination still pulls pages from this side's
   * QEMU, so this waits until the post-copy stream has sent everything; then records durably
   * that it never resumes the VM (completed.json at the last applied epoch: the commit point of
   * docs/completion.md, which a restarted sidecar honours) and only then tells the destination,
   * which releases its outputs and goes on. Throws (the caller fences and reports failed) when
   * the stream cannot finish or the record cannot be written.
   */
  async #giveUp(reason: string, cause: unknown): Promise<void> {
    const vm = this.#vm;
    this.#log.error('cannot restore here while the destination runs the VM: giving the rollback up', { error: errorFields(cause) });
    await this.#standby?.discard();
    await this.#waitStreamSent();
    const epoch = await this.#store.recordGaveUp();
    this.#completedEpoch = epoch;
    this.#fenced = true; // never ABORT from here on
    this.phase.to('continued-on-destination', { epoch, code: (cause as TetherError).code });
    vm.place = 'gone';
    const confirmed = notifyDestination({
      psk: this.#opts.host.peer.key,
      to: this.#opts.to,
      migrationId: this.id,
      vm: vm.name,
      outcome: 'completed',
      epoch,
      log: this.#log,
      ...(this.#channel ? { channel: this.#channel } : {}),
    });
    const answer = await Promise.race([confirmed, sleep(vm.config.checkpoint.failoverTimeoutMs).then(() => 'pending' as const)]);
    this.#stopTimers();
    this.#channel?.close();
    await vm.stopQemu().catch(() => {});
    await fs.rm(vm.ramFile, { force: true }).catch(() => {});
    const cleanup = async () => {
      await vm.removeRam().catch(() => {});
      await vm.forget().catch(() => {});
      await vm.setMigrationMarker(null).catch(() => {});
    };
    if (answer === 'pending') void confirmed.then(cleanup);
    else await cleanup();
    this.#finish({ outcome: 'continued-on-destination', reason, err: cause, handover: answer });
  }

  /** Until this side's QEMU has sent the destination every page (query-migrate 'completed'). */
  async #waitStreamSent(): Promise<void> {
    const q = this.#vm.qemu;
    for (;;) {
      if (!q || q.hasExited) throw new TetherError('ERR_SOURCE_QEMU_EXITED', 'source QEMU exited before the destination had every page');
      const m = (await q.qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
      if (m.status === 'completed') return;
      if (m.status === 'failed' || m.status === 'cancelled' || m.status === 'postcopy-paused') {
        throw new TetherError('ERR_QEMU_MIGRATION_FAILED', `source QEMU migration ${m.status} before the destination had every page`);
      }
      await sleep(20);
    }
  }

  /** No tether peer answered: undo the marker and report the cause as an error. */
  async #unreached(e: unknown): Promise<void> {
    if (this.#decided) return;
    this.#decided = true;
    this.#stopTimers();
    this.#log.warn('destination not reached: nothing was migrated', { error: errorFields(e) });
    this.phase.to('unreached');
    this.#vm.place = 'running';
    await this.#vm.setMigrationMarker(null).catch(() => {});
    await fs.rm(this.#vm.checkpointDir, { recursive: true, force: true }).catch(() => {});
    this.#opts.metrics?.migrations.inc({ role: 'source', outcome: 'unreached' });
    this.#result.reject(e);
  }

  async #cancelPrecopy(): Promise<void> {
    const q = this.#vm.qemu;
    if (!q || q.hasExited) throw new TetherError('ERR_SOURCE_QEMU_EXITED', 'source QEMU is gone before switchover');
    await q.qmp.execute('migrate_cancel').catch(() => {});
    for (let i = 0; i < 500; i++) {
      const st = (await q.qmp.execute('query-migrate')) as { status?: string };
      if (st.status !== 'active' && st.status !== 'cancelling' && st.status !== 'setup' && st.status !== 'pre-switchover') break;
      await sleep(20);
    }
    const s = (await q.qmp.execute('query-status')) as { status: string };
    if (s.status !== 'running') await q.qmp.execute('cont');
    // This QEMU goes on running the VM: the next migration adds credentials of its own.
    await this.#tls?.tearDown();
  }

  #finish(p: {
    outcome: MigrationResult['outcome'];
    reason?: string;
    err?: unknown;
    rollback?: RollbackFigures;
    handover?: MigrationResult['handover'];
  }): void {
    void this.#standby?.discard(); // a no-op once promoted
    void this.#tls?.tearDown(); // key files gone already; the object goes with a killed QEMU
    void this.#applyChain.then(() => this.#diskSink?.close()).catch(() => {});
    // a completion keeps its marker until the destination confirmed (see #onCompleteRequest)
    if (p.outcome !== 'completed') void this.#vm.setMigrationMarker(null).catch(() => {});
    const m = this.#opts.metrics;
    m?.migrations.inc({ role: 'source', outcome: p.outcome });
    if (p.rollback) {
      m?.rollbacks.inc({ reason: p.reason ?? 'unknown' });
      if (p.outcome === 'rolled-back') m?.restore.observe(p.rollback.restoreMs / 1000);
    }
    const err = p.err as { code?: string; message?: string } | undefined;
    this.#result.resolve({
      vm: this.#vm.name,
      migrationId: this.id,
      outcome: p.outcome,
      ...(p.reason ? { reason: p.reason } : {}),
      ...(err ? { error: { code: err.code ?? 'ERR_UNKNOWN', message: err.message ?? String(err) } } : {}),
      totalMs: round(nowMs() - this.#t0),
      switchoverMs: this.#switchoverAt === null ? null : round(this.#switchoverAt - this.#t0),
      checkpoints: this.#ckptBytes.count,
      appliedEpoch: this.#appliedEpoch,
      tracker: this.#tracker,
      pauseMs: summarize(this.#pauses),
      checkpointBytes:
        this.#ckptBytes.count === 0
          ? null
          : {
              avg: Math.round(this.#ckptBytes.sum / this.#ckptBytes.count),
              p50: Math.round(this.#ckptBytes.quantile(50)),
              max: this.#ckptBytes.max,
              total: this.#ckptBytes.sum,
            },
      ...(p.rollback ? { rollback: p.rollback } : {}),
      ...(p.handover ? { handover: p.handover } : {}),
    });
  }

  async #reportProgress(): Promise<void> {
    const q = this.#vm.qemu;
    if (this.#decided || !q || q.hasExited) return;
    try {
      const m = (await q.qmp.execute('query-migrate', undefined, { timeoutMs: 2000 })) as {
        status?: string;
        ram?: { transferred: number; remaining: number; total: number; 'postcopy-requests'?: number };
      };
      this.#progress({
        phase: this.phase.state,
        qemuStatus: m.status,
        ram: m.ram
          ? {
              transferred: m.ram.transferred,
              remaining: m.ram.remaining,
              total: m.ram.total,
              // pages the destination faulted on and asked for out of order, so far
              postcopyRequests: m.ram['postcopy-requests'],
            }
          : undefined,
        appliedEpoch: this.#appliedEpoch,
        lastPauseMs: this.#lastPauseMs,
      });
    } catch {
      /* progress is best effort */
    }
  }

  #progress(p: Record<string, unknown>): void {
    this.#opts.onProgress?.({ t: round(nowMs() - this.#t0), migrationId: this.id, ...p });
  }

  #waitControl(kind: PeerControl['kind'], timeoutMs: number): Promise<PeerControl> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#controlWaiters.delete(kind);
        reject(new TetherError('ERR_PEER_TIMEOUT', `destination did not answer '${kind}' within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#controlWaiters.set(kind, (c) => {
        clearTimeout(timer);
        if (this.#decided) reject(new TetherError('ERR_MIGRATION_ENDED', 'migration ended'));
        else resolve(c);
      });
    });
  }

  /**
   * Polls query-migrate until `want`; a MIGRATION event (capability `events`) cuts the wait
   * short, so the switchover's stop is acted on at once rather than up to a poll later.
   */
  async #waitMigrationStatus(want: string): Promise<{ status?: string; ram?: { transferred?: number } }> {
    const q = this.#vm.qemu!;
    const nap = new Nap();
    const onEvent = (name: string) => {
      if (name === 'MIGRATION') nap.wake();
    };
    q.qmp.on('event', onEvent);
    try {
      for (;;) {
        if (this.#decided) return {};
        const m = (await q.qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string; ram?: { transferred?: number } };
        if (m.status === want) return m;
        if (m.status === 'failed' || m.status === 'cancelled') {
          throw new TetherError('ERR_QEMU_MIGRATION_FAILED', `source QEMU migration ${m.status}: ${m['error-desc'] ?? ''}`);
        }
        await nap.nap(10);
      }
    } finally {
      q.qmp.off('event', onEvent);
    }
  }

  #every(ms: number, fn: () => void): void {
    this.#timers.push(setInterval(fn, ms));
  }

  #stopTimers(): void {
    for (const t of this.#timers) clearInterval(t);
    this.#timers = [];
    this.#holdAcksNap.wake();
  }
}

/**
 * fallocate(2) of the whole file (mode 0: holes become allocated zero pages, data is kept), with
 * util-linux's fallocate: Node has no binding for it. A fixed system binary and this host's own
 * path, nothing a peer names.
 */
function allocateRamFile(file: string, bytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('fallocate', ['-l', String(bytes), file], { timeout: 120_000 }, (err, _out, stderr) => {
      if (err) reject(new Error(String(stderr).trim() || err.message));
      else resolve();
    });
  });
}

export async function waitRunning(vm: VmInstance, timeoutMs = 60_000): Promise<void> {
  await waitStatus(vm, 'running', timeoutMs);
}

async function waitStatus(vm: VmInstance, status: string, timeoutMs: number): Promise<void> {
  const q = vm.qemu!;
  const deadline = nowMs() + timeoutMs;
  while (nowMs() < deadline) {
    if (q.hasExited) throw new TetherError('ERR_RESTORE_FAILED', `restored QEMU exited: ${q.stderrTail?.() ?? ''}`);
    const s = (await q.qmp.execute('query-status')) as { status: string };
    if (s.status === status) return;
    await sleep(10);
  }
  throw new TetherError('ERR_RESTORE_FAILED', `restored QEMU not ${status} after ${timeoutMs} ms`);
}

/**
 * A restored QEMU (started with -S) has loaded its device state and waits paused:
 * `connectNics` runs first (the NICs are QEMU's own tap backends, which need nothing from
 * the sidecar; callers pass none), then it runs. A failing hook is logged; the VM runs
 * regardless.
 */
/** The MAC announcement of a restored VM once it runs (the live rollback and a restarted sidecar alike). */
export async function announceRestored(vm: VmInstance): Promise<void> {
  await vm.qemu!.qmp.execute('announce-self', { initial: 50, max: 550, rounds: 5, step: 100 });
}

export async function resumeRestored(vm: VmInstance, connectNics: () => Promise<void> | undefined, timeoutMs = 60_000): Promise<void> {
  await waitStatus(vm, 'paused', timeoutMs);
  await Promise.resolve(connectNics())?.catch((e: unknown) =>
    vm.log.warn('NIC not reconnected before the restored VM runs', { error: errorFields(e) }),
  );
  await vm.qemu!.qmp.execute('cont');
  await waitRunning(vm, timeoutMs);
}
