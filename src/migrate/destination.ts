import { qmpTimeMs, type QmpTimestamp } from '../qmp/codec.ts';
import fs from 'node:fs/promises';
import path from 'node:path';
import { checkpointMessages } from '../checkpoint/assembler.ts';
import type { Checkpoint } from '../checkpoint/assembler.ts';
import { writeCompletingRecord } from '../checkpoint/store.ts';
import type { Message } from '../peer/messages.ts';
import { PAGE_SIZE } from '../checkpoint/messages.ts';
import type { HostConfig, VmConfig } from '../config/types.ts';
import { remoteError, TetherError } from '../errors.ts';
import type { ErrorCode } from '../errors.ts';
import { createTracker } from '../memory/select.ts';
import type { DirtyTracker } from '../memory/dirty-tracker.ts';
import type { PeerChannel } from '../peer/channel.ts';
import type { Logger } from '../util/log.ts';
import { errorFields } from '../util/log.ts';
import { StateMachine } from '../util/state.ts';
import { deferred, Nap, nowMs, sleep } from '../util/time.ts';
import { QemuGuard } from '../vm/guard.ts';
import { VmInstance } from '../vm/instance.ts';
import { asPeerControl } from '../peer/control.ts';
import { existsSync } from 'node:fs';
import { cleanupCrashPoint, CUT_COMPLETION, HOLD_COMPLETION_RELEASE } from './faults.ts';
import type { Faults } from './faults.ts';
import { BlockJournal } from '../disk/journal.ts';
import { JournalLog, journalLogPath } from '../disk/journal-log.ts';
import { composeOutputs, latchOutputs, noOutputs } from '../epoch/outputs.ts';
import type { DiskExtent, EpochOutputs } from '../epoch/outputs.ts';
import { CheckpointWindow } from './window.ts';
import { migrationUri } from './uri.ts';
import { StreamTls, streamPsk } from './stream-tls.ts';
import type { DirtyPages } from '../native.ts';

export type DestPhase = 'preparing' | 'incoming' | 'running' | 'completing' | 'completed' | 'fenced';

const TRANSITIONS: Record<DestPhase, readonly DestPhase[]> = {
  preparing: ['incoming', 'fenced'],
  incoming: ['running', 'fenced'],
  // running -> completed: the source gave a rollback up that it could not carry out (hold, then
  // resolve completed): the VM continues here.
  running: ['completing', 'completed', 'fenced'],
  // Asked the source to complete: only the source's answer ends this phase.
  completing: ['completed', 'fenced'],
  completed: [],
  fenced: [],
};

/** Where the destination records that it asked to complete (see writeCompletingRecord). */
export const completingRecordPath = (vm: VmInstance): string => path.join(vm.dir, 'completing.json');

/** Page entries per PAGES message: 1024 pages = 4 MiB of data at most. */
const PAGES_PER_MESSAGE = 1024;

export interface DestinationOptions {
  host: HostConfig;
  channel: PeerChannel;
  /** The migration's id, from the source's `prepare` (epoch/id.ts MIGRATION_ID_RE). */
  migrationId: string;
  vmConfig: VmConfig;
  /** False when the source QEMU's stream carries no configuration section. */
  sendConfiguration: boolean;
  /**
   * Checkpoints the source accepts ahead of its last applied one (its `prepare`; 1 when it
   * named none). The window used is the smaller of this and this host's checkpoint.window.
   */
  sourceWindow?: number;
  log: Logger;
  faults: Faults;
  outputs?: EpochOutputs;
  /**
   * Called once the incoming QEMU runs (the guest does not yet: it waits for the
   * migration stream), before the source is told to start: connect the NICs here.
   */
  onQemuStarted?: (vm: VmInstance) => Promise<void>;
  /** Completion recorded, outputs passing: take the window's relays out of QEMU's path (not awaited, must not throw). */
  onCompleted?: (vm: VmInstance) => Promise<void>;
  /** Called once the VM instance exists on this host (for status), and when it ends. */
  onInstance?: (vm: VmInstance) => void;
  /** Called for each answer (resolve) refused because it names another migration. */
  onStaleResolve?: () => void;
}

/** The destination's reply to a resolve: RESOLVED's `known` and, when refused, why. */
export type ResolveAnswer = { known: true } | ResolveRefusal;
export type ResolveRefusal = { known: false; code: ErrorCode; message: string };

/**
 * The refusal of a resolve that names another migration than `current` (the one this host
 * holds for the VM; null: none): a stale answer, retried for minutes, to an earlier migration
 * of the same VM. Null when the ids match. Shared by the running destination and by a sidecar
 * restarted during the completion handshake.
 */
export function staleResolve(current: string | null, asked: string): ResolveRefusal | null {
  if (current === asked) return null;
  return {
    known: false,
    code: 'ERR_MIGRATION_ID_MISMATCH',
    message: `the answer is for migration ${asked}; this host holds ${current ?? 'none'} of the VM`,
  };
}

/**
 * The destination side: runs the incoming QEMU and, from the moment the VM
 * runs here, the epoch loop — barrier (stop, collect dirty pages with their
 * bytes, save device state, seal outputs, cont), send checkpoint k, release
 * epochs <= k on ACK(k). Up to checkpoint.window checkpoints are in flight at
 * once (window.ts), sent strictly in order, so a large checkpoint does not
 * lengthen the next epoch. With no ACK for fenceTimeoutMs it fences itself:
 * stops the VM and drops every held output.
 */
export class DestinationMigration {
  readonly phase: StateMachine<DestPhase>;
  readonly vm: VmInstance;
  /** The source's id of this migration: a resolve naming another one is never acted on. */
  readonly id: string;
  readonly #opts: DestinationOptions;
  readonly #ch: PeerChannel;
  #outputs: ReturnType<typeof latchOutputs>;
  /** The disk's block-write journal (VMs with a disk). */
  #journal: BlockJournal | undefined;
  /** Fault injection (hold-writeback): resolved once the write-back stopped after its first extent. */
  readonly #writeBackHeld = deferred<void>();
  readonly #log: Logger;
  /**
   * Final epoch once this side asked the source to complete. From then on it never fences
   * by killing: on silence it pauses the guest (RAM and QEMU kept) until the source answers.
   */
  #completing: number | null = null;
  /** Guest paused by this side while waiting for the source's answer. */
  #pausedForAnswer = false;
  /** The source answered rolled-back: the one case in which a completing destination fences. */
  #rolledBack = false;
  /**
   * The source has decided to roll back and checks it can restore before fencing this side
   * (`hold`, docs/design.md "Restore before fence"). As while completing, this side then never
   * fences by kill on its own: only ABORT / resolve rolled-back fences, resolve completed means
   * the source gave the rollback up and the VM continues here; silence or a lost channel pauses.
   */
  #held = false;
  #answerDropped = false;
  /** Kills the incoming QEMU if this sidecar dies before the migration window ends. */
  #guard: QemuGuard | undefined;
  #table: Buffer;
  #hashesDone = deferred<void>();
  #qemuCompleted = false;
  /** Checkpoints taken and not yet acknowledged (created when the epoch loop starts). */
  #window: CheckpointWindow | undefined;
  /** TLS credentials of the incoming stream (stream-tls.ts). */
  #tls: StreamTls | undefined;

  /** Highest epoch the source has acknowledged (its outputs are released); 0 before any. */
  get ackedEpoch(): number {
    return this.#window?.lastAcked ?? 0;
  }
  /** Last message of any kind from the source (ACKs and its heartbeats). */
  #lastHeard = nowMs();
  #fenceTimer: NodeJS.Timeout | undefined;
  #heartbeatTimer: NodeJS.Timeout | undefined;
  /**
   * Since when the barrier has been waiting on QEMU (`stop`, the device-state save, `cont`);
   * null between barriers and during the dirty-page scan. Only a QEMU command can hang on the
   * source (a vCPU stuck on a page post-copy can no longer fetch): the scan reads allocated
   * pages of this host's RAM file only, off the main thread, and always ends, however long it
   * takes on a large VM, so it never silences the heartbeat.
   */
  #barrierSince: number | null = null;
  /** Resolves when the current (or last) barrier has ended with `cont`, or the loop failed. */
  #barrierEnd = deferred<void>();
  #tracker: DirtyTracker | undefined;
  #stopped = false;
  readonly done = deferred<DestPhase>();

  constructor(opts: DestinationOptions) {
    this.#opts = opts;
    this.#ch = opts.channel;
    this.id = opts.migrationId;
    this.#outputs = latchOutputs(opts.outputs ?? noOutputs);
    this.vm = new VmInstance(opts.host, opts.vmConfig, opts.log);
    this.#log = this.vm.log.child({ role: 'destination', migrationId: this.id });
    this.phase = new StateMachine<DestPhase>('incoming migration', 'preparing', TRANSITIONS, this.#log);
    this.#table = Buffer.alloc((this.vm.ramBytes / PAGE_SIZE) * 8);
  }

  /** Handle a message from the source (the daemon routes the channel here). */
  onMessage(m: Message): void {
    this.#lastHeard = nowMs();
    switch (m.type) {
      case 'hashes': {
        const end = m.startPfn * 8 + m.hashes.length;
        if (end > this.#table.length) {
          void this.fence('bad-hashes', new TetherError('ERR_PEER_PROTOCOL', 'HASHES beyond the end of guest RAM'));
          return;
        }
        m.hashes.copy(this.#table, m.startPfn * 8);
        return;
      }
      case 'control': {
        try {
          const c = asPeerControl(m.body);
          if (c.kind === 'hashes-done') this.#hashesDone.resolve();
          else if (c.kind === 'hold') this.#onHold(c.migrationId);
          else if (c.kind === 'resolve') {
            if (this.#opts.faults.cutCompletion === CUT_COMPLETION.crashOnAnswer) {
              this.#log.warn('fault injection: sidecar dies on the source answer, before acting on it');
              process.kill(process.pid, 'SIGKILL');
            }
            if (this.#opts.faults.cutCompletion === CUT_COMPLETION.answer && !this.#answerDropped) {
              this.#answerDropped = true;
              this.#log.warn('fault injection: dropping the source answer and the channel', { outcome: c.outcome });
              this.#ch.close();
              return;
            }
            const a = this.resolve(c);
            this.#ch
              .send({
                type: 'control',
                body: { kind: 'resolved', migrationId: c.migrationId, known: a.known, ...(a.known ? {} : { code: a.code }) },
              })
              .catch(() => {});
          }
        } catch (e) {
          void this.fence('bad-control-message', e);
        }
        return;
      }
      case 'ack': {
        // A late ACK after fencing must not let a held output out (latchOutputs would refuse it too).
        if (this.#stopped) return;
        // ACK(k) means k is durable on the source, which applies strictly in order: every
        // epoch <= k is, and release(k) lets their outputs out, oldest first.
        const k = this.#window?.ack(m.epoch) ?? null;
        if (k !== null) this.#outputs.release(k);
        else this.#log.warn('unexpected ACK', { epoch: m.epoch, inflight: this.#window?.inflight ?? [] });
        return;
      }
      case 'nack':
        void this.fence('nack', remoteError(m.code, m.message));
        return;
      case 'abort':
        // S sends ABORT only when it rolls back: during the handshake (or a hold) that is its answer.
        if (this.#waitsForSource) this.#rolledBack = true;
        void this.fence('source-abort', remoteError(m.code, m.reason));
        return;
      case 'heartbeat':
        return;
      default:
        this.#log.warn('unexpected message from source', { type: m.type });
    }
  }

  /** Waiting for the source's word (completion handshake, or a hold): never fence by kill on its own. */
  get #waitsForSource(): boolean {
    return this.#completing !== null || this.#held;
  }

  /** The source decided to roll back and first checks it can restore: see #held. */
  #onHold(migrationId: string): void {
    if (migrationId !== this.id || this.#stopped) {
      this.#log.warn('ignored a hold for another migration', { holdFor: migrationId });
      return;
    }
    this.#held = true;
    this.#log.warn('the source holds this migration (it decided to roll back and checks it can restore): outputs held');
    // The source may give the rollback up and leave the VM here: this sidecar's death must
    // freeze this QEMU, not destroy it.
    this.#guard?.pauseOnly();
  }

  /** Channel to the source is gone: no ACK can come any more. */
  onChannelClosed(err: Error | undefined): void {
    if (this.#waitsForSource && !this.#stopped) {
      // The answer may still come, on a channel the source opens to this host's peer port.
      void this.#pauseForAnswer('peer-channel-closed');
      return;
    }
    if (!this.phase.is('completed', 'fenced')) void this.fence('peer-channel-closed', err);
  }

  /**
   * The source's answer to this side's completion request (on the migration channel or on a
   * new one). known=false when it does not match this migration: above all when it names
   * another migration id (a retried answer to an earlier migration of this VM), which is
   * logged, counted and never acted on: it must not fence or complete this one.
   */
  resolve(c: { migrationId: string; outcome: 'completed' | 'rolled-back'; epoch: number }): ResolveAnswer {
    const { outcome, epoch } = c;
    const stale = staleResolve(this.id, c.migrationId);
    if (stale) {
      this.#log.warn('ignored an answer for another migration of this VM', {
        code: stale.code,
        answerFor: c.migrationId,
        outcome,
        epoch,
      });
      this.#opts.onStaleResolve?.();
      return stale;
    }
    const unknown = (message: string): ResolveAnswer => ({ known: false, code: 'ERR_NO_MIGRATION', message });
    if (outcome === 'rolled-back') {
      if (this.phase.is('completed')) {
        this.#log.error('source says rolled back after it answered completed: ignored', { epoch });
        return unknown('completed already');
      }
      this.#rolledBack = true;
      void this.fence('source-rolled-back');
      return { known: true };
    }
    if (this.phase.is('completed'))
      return this.#completing === epoch || this.#held ? { known: true } : unknown('completed with another final epoch');
    if (this.#held && !this.#stopped) {
      // The source gave up a rollback it could not carry out, recorded durably (its completed.json
      // at its last applied epoch): it never resumes the VM, which continues here.
      this.#log.warn('the source could not restore and gave the rollback up: the VM continues here', { epoch });
      void this.#finishCompleted(epoch);
      return { known: true };
    }
    if (this.#completing === null || this.#completing !== epoch || this.#stopped) {
      this.#log.error('completion answer does not match this migration', { epoch, completing: this.#completing });
      return unknown('no completion request of that final epoch');
    }
    void this.#finishCompleted(epoch);
    return { known: true };
  }

  /** Silence or a lost channel during the handshake: stop the guest, keep QEMU and its RAM. */
  async #pauseForAnswer(reason: string): Promise<void> {
    if (this.#pausedForAnswer || this.#stopped) return;
    this.#pausedForAnswer = true;
    this.#log.warn('no answer to the completion request yet: guest paused, outputs held', { reason, finalEpoch: this.#completing });
    const q = this.vm.qemu;
    // `stop` waits for in-flight block requests: a write waiting for room in a full
    // journal (no release comes now) must be admitted, or the stop never returns.
    this.#outputs.quiesce?.();
    if (q && !q.hasExited) await q.qmp.execute('stop').catch(() => {});
  }

  async run(): Promise<void> {
    this.#barrierEnd.resolve(); // no barrier yet
    try {
      await this.#run();
    } catch (e) {
      this.#barrierEnd.resolve();
      if (!this.#stopped) {
        this.#log.error('incoming migration failed', { error: errorFields(e) });
        await this.#ch
          .send({ type: 'abort', code: (e as TetherError).code ?? 'ERR_DESTINATION', reason: (e as Error).message })
          .catch(() => {});
        await this.fence('destination-error', e);
      }
    }
  }

  async #run(): Promise<void> {
    const vm = this.vm;
    await this.#journalDisk();
    await vm.startIncoming(this.#opts.sendConfiguration);
    // From here until completed or fenced, this guest must not outlive this sidecar.
    this.#guard = QemuGuard.arm(vm.qemu!.pid);
    await vm.setMigrationMarker({
      role: 'destination',
      migrationId: this.id,
      qemuPid: vm.qemu?.pid ?? null,
      peer: this.#ch.remote,
      startedAt: new Date().toISOString(),
    });
    this.#opts.onInstance?.(vm);
    await this.#opts.onQemuStarted?.(vm);
    const qemu = vm.qemu!;
    qemu.exited.then(() => {
      if (!this.#stopped && !this.phase.is('completed')) {
        this.#log.error('destination QEMU exited during migration');
        this.#ch.send({ type: 'abort', code: 'ERR_DEST_QEMU_EXITED', reason: 'destination QEMU exited' }).catch(() => {});
        void this.fence('destination-qemu-exited');
      }
    });
    await qemu.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] });
    // Before the port opens: QEMU accepts no stream that does not prove this migration's key.
    if (!this.#opts.faults.plainStream) {
      this.#tls = await StreamTls.setUp({
        qmp: qemu.qmp,
        vmDir: vm.dir,
        endpoint: 'server',
        psk: streamPsk(this.#opts.host.peer.key, this.id),
        log: this.#log,
      });
    } else this.#log.warn('fault injection: the incoming migration stream goes without TLS');
    const uri = await this.#listen();
    this.phase.to('incoming', { uri });
    await this.#ch.send({ type: 'control', body: { kind: 'ready', uri } });

    // Switchover: from the first instant the VM runs here, outputs are held (epoch 1).
    const qemuResumeAt = await this.#waitRunning();
    if (this.#stopped) return;
    this.phase.to('running', qemuResumeAt === undefined ? {} : { qemuResumeAt });
    // The stream's handshake is over (the VM runs on what it carried): the key file goes.
    void this.#tls?.removeKeys();
    this.#lastHeard = nowMs();
    this.#fenceTimer = setInterval(() => this.#checkFence(), 50);
    // Heartbeats keep the source's lease alive between checkpoints (and while the
    // first one waits for the baseline hashes).
    this.#heartbeatTimer = setInterval(() => {
      // A barrier stuck in QEMU (a vCPU stuck on a page the source can no longer send)
      // silences the heartbeat, so the source's lease runs out. The scan does not count.
      const stuck = this.#barrierSince !== null && nowMs() - this.#barrierSince > vm.config.checkpoint.fenceTimeoutMs / 2;
      if (!this.#stopped && !this.#ch.closed && !stuck) {
        this.#ch.send({ type: 'heartbeat', epoch: this.#window?.lastTaken ?? 0, sentAt: Date.now() }).catch(() => {});
      }
    }, 200);

    await this.#hashesDone.promise;
    if (this.#stopped) return;
    this.#tracker = await createTracker(vm.config.checkpoint.dirtyTracker, {
      ramPath: vm.ramFile,
      ramBytes: vm.ramBytes,
      qemuPid: qemu.pid,
      threads: vm.config.checkpoint.hashThreads,
    });
    await this.#tracker.start(this.#table);
    this.#log.info('dirty tracker started', { tracker: this.#tracker.kind });
    if (this.#opts.faults.delayFirstCheckpointMs) await sleep(this.#opts.faults.delayFirstCheckpointMs);
    await this.#epochLoop();
  }

  /**
   * Before this host's QEMU exists: serve the VM's disk through a journal in
   * journal mode, so no write the guest makes here reaches the shared image
   * before the checkpoint that carries it is acknowledged (the source writes the
   * image until completion). The journal joins the barrier next to the gates.
   */
  async #journalDisk(): Promise<void> {
    const disk = this.vm.config.disk;
    if (!disk) return;
    let journal: BlockJournal | undefined;
    const writeThrough = this.#opts.faults.journalWriteThrough ?? false;
    // The write-ahead log: a restarted sidecar finds this migration's journal in it.
    const wal = writeThrough
      ? undefined
      : await JournalLog.create(journalLogPath(this.vm.journalDir, this.vm.name, this.id), {
          vm: this.vm.name,
          migrationId: this.id,
          size: (await fs.stat(disk.image)).size,
        });
    this.vm.diskDevice = (image) => {
      journal = new BlockJournal(image, {
        maxBytes: disk.journalMaxBytes,
        writeThrough,
        log: this.#log,
        ...(wal ? { wal } : {}),
        ...(this.#opts.faults.holdWriteback || this.#opts.faults.holdWritebackEarly
          ? {
              writeBackHold: () => {
                this.#writeBackHeld.resolve();
                return new Promise<void>(() => {}); // never: the test kills this sidecar here
              },
            }
          : {}),
      });
      journal.journal(1);
      return journal;
    };
    try {
      await this.vm.startDisk();
    } catch (e) {
      await wal?.remove();
      throw e;
    }
    if (!journal) {
      await wal?.remove();
      throw new TetherError('ERR_JOURNAL_STATE', 'the disk was already served without a journal');
    }
    this.#journal = journal;
    // before anything reached the outputs: latch the composition of the gates and the journal
    this.#outputs = latchOutputs(composeOutputs([this.#opts.outputs ?? noOutputs, journal]));
  }

  async #listen(): Promise<string> {
    const { listenHost, portRange } = this.#opts.host.migration;
    const qmp = this.vm.qemu!.qmp;
    let lastErr: unknown;
    for (let port = portRange[0]; port <= portRange[1]; port++) {
      const uri = migrationUri(listenHost, port); // the only form the source accepts (uri.ts)
      try {
        await qmp.execute('migrate-incoming', { uri });
        return uri;
      } catch (e) {
        lastErr = e;
      }
    }
    throw new TetherError('ERR_NO_MIGRATION_PORT', `no free port for the incoming migration in ${portRange.join('-')}`, {
      cause: errorFields(lastErr),
    });
  }

  /**
   * Until QEMU runs the guest here: polls query-status, woken at once by the RESUME event.
   * Returns QEMU's own time of that RESUME (QMP timestamp), the end of the switchover
   * blackout, when the event was seen.
   *
   * QEMU 7.2 runs the incoming TLS handshake on a blocking socket in its main loop: a
   * client that connects to the port and then stays silent freezes this QEMU (QMP too)
   * until it goes away, and the source's QEMU with it once it connects. Measured: QMP
   * unanswered for as long as such a connection stays open. So a QMP silence of
   * fenceTimeoutMs before the VM runs here is ERR_INCOMING_STALLED: this side aborts
   * and fences (kills its QEMU, which also frees the source's QEMU from its handshake),
   * and the source, which still runs the VM, rolls back. (A connection that sends
   * anything but the key's handshake is refused by QEMU at once; the port stays open.)
   */
  async #waitRunning(): Promise<number | undefined> {
    const qmp = this.vm.qemu!.qmp;
    const stallMs = this.vm.config.checkpoint.fenceTimeoutMs;
    let resumedAt: number | undefined;
    const nap = new Nap();
    const onEvent = (name: string, _d: unknown, ts: QmpTimestamp | undefined) => {
      if (name !== 'RESUME') return;
      if (resumedAt === undefined && ts) resumedAt = qmpTimeMs(ts);
      nap.wake();
    };
    qmp.on('event', onEvent);
    try {
      while (!this.#stopped) {
        const s = (await qmp.execute('query-status', undefined, { timeoutMs: stallMs }).catch((e: unknown) => {
          throw (e as TetherError).code === 'ERR_QMP_TIMEOUT' && !this.#stopped
            ? new TetherError('ERR_INCOMING_STALLED', `the incoming QEMU did not answer QMP for ${stallMs} ms before the switchover`)
            : e;
        })) as { status: string };
        if (s.status === 'running') return resumedAt;
        await nap.nap(10);
      }
      return undefined;
    } finally {
      qmp.off('event', onEvent);
    }
  }

  async #epochLoop(): Promise<void> {
    const vm = this.vm;
    const qmp = vm.qemu!.qmp;
    const devPath = path.join(vm.dir, 'devstate.out');
    const cfg = vm.config.checkpoint;
    const interval = cfg.intervalMs;
    const window = new CheckpointWindow(Math.min(cfg.window, this.#opts.sourceWindow ?? 1));
    this.#window = window;
    // Checkpoints go out strictly in order, one after the other, while later epochs run.
    let sending: Promise<void> = Promise.resolve();
    let sendError: unknown;
    for (let epoch = 1; !this.#stopped; epoch++) {
      // At most window.size checkpoints unacknowledged: the source's memory and the
      // guest's held outputs stay bounded when the link or the source falls behind.
      await window.room();
      if (this.#stopped) return;
      if (sendError) throw sendError;
      // Before any QMP command: a full packet gate stops reading QEMU's NIC socket, and
      // QEMU 7.2 then blocks its main loop in that write (it would answer neither
      // query-migrate nor `stop`); quiesce lets the outputs read on until seal().
      this.#outputs.quiesce?.();
      // The migration stream is complete once QEMU says so. (The incoming side emits
      // MIGRATION events only with the 'events' capability, so ask.)
      if (!this.#qemuCompleted) {
        const st = (await qmp.execute('query-migrate')) as { status?: string };
        if (st.status === 'completed') this.#qemuCompleted = true;
      }
      // The last checkpoint taken is the final one once the stream is complete: the source
      // needs nothing more from its QEMU, and everything the guest does from here on stays
      // held until the source has recorded completion (docs/completion.md). With none taken
      // yet, this barrier's checkpoint is the final one.
      const streamDone = this.#qemuCompleted && !this.#completionHeld();
      if (streamDone && window.lastTaken >= 1) {
        // No barrier follows: the journal's and gates' bounds hold again for the
        // whole completion phase (quiesce() had lifted them for a `stop`).
        this.#outputs.unquiesce?.();
        break;
      }
      const final = streamDone;

      const t0 = nowMs();
      this.#barrierSince = t0;
      this.#barrierEnd = deferred<void>();
      await qmp.execute('stop');
      const tStopped = nowMs();
      // One native pass: the changed pages and their bytes (no second read of RAM). Local
      // work that always ends: the heartbeat goes on however long it takes.
      this.#barrierSince = null;
      const f = this.#opts.faults;
      const slow = f.slowScanMs && epoch === (f.slowScanEpoch ?? 1) ? f.slowScanMs : undefined;
      if (slow) this.#log.warn('fault injection: slow dirty-page scan', { epoch, ms: slow });
      const pages = await this.#tracker!.collectPages(slow ? { faultDelayMs: slow } : undefined);
      const t1 = nowMs();
      this.#barrierSince = t1;
      await qmp.execute('xen-save-devices-state', { filename: devPath, live: false });
      const disk = await this.#outputs.seal(epoch);
      // the VM is stopped: exactly what the guest wrote here up to barrier k
      const guestDiskBytes = this.#journal?.stats.journaledBytes ?? 0;
      const t2 = nowMs();
      await qmp.execute('cont');
      const tCont = nowMs();
      this.#barrierSince = null;
      this.#barrierEnd.resolve();
      // Read after cont: only the next barrier rewrites the file.
      const devstate = await fs.readFile(devPath);
      const pauseMs = tCont - t0;
      void window.take(epoch);
      const stats = {
        epoch,
        pauseMs,
        stopMs: tStopped - t0,
        collectMs: t1 - tStopped,
        saveMs: t2 - t1,
        contMs: tCont - t2,
        inflight: window.inflight.length,
        guestDiskBytes,
      };
      sending = sending.then(async () => {
        if (this.#stopped || sendError) return;
        try {
          await this.#sendCheckpoint(epoch, pages, devstate, disk, stats);
        } catch (e) {
          sendError ??= e;
          // The loop may be waiting for room (an ACK that cannot come now): fail the window.
          if (!this.#stopped) void this.#fail(e);
        }
      });
      if (final) break;
      await sleep(interval);
    }
    if (this.#stopped) return;
    // Completion handshake (docs/completion.md): only after every checkpoint taken is
    // acknowledged, so the final one is the last in order and the source holds it whole.
    await sending;
    if (sendError) throw sendError;
    await window.drained();
    if (this.#stopped) return;
    const finalEpoch = window.lastTaken;
    // Outputs stay held and this side stops fencing by kill; only the source's answer
    // decides. Recorded first, so that a restarted sidecar waits for that answer too.
    await writeCompletingRecord(completingRecordPath(vm), finalEpoch);
    this.#completing = finalEpoch;
    this.phase.to('completing', { finalEpoch });
    // The source may record completion any moment now: this QEMU may then hold the only
    // running copy, so this sidecar's death must freeze it, not destroy it.
    this.#guard?.pauseOnly();
    if (this.#opts.faults.cutCompletion === CUT_COMPLETION.request) {
      this.#log.warn('fault injection: dropping the completion request and the channel', { finalEpoch });
      this.#ch.close();
      return;
    }
    await this.#ch.send({ type: 'control', body: { kind: 'complete', migrationId: this.id, finalEpoch } }).catch(() => {});
  }

  #completionHeldLogged = false;

  /** Fault injection (hold-completion): the stream is complete, but the test has not released the completion yet. */
  #completionHeld(): boolean {
    if (!this.#opts.faults.holdCompletion || existsSync(path.join(this.vm.dir, HOLD_COMPLETION_RELEASE))) return false;
    if (!this.#completionHeldLogged) this.#log.warn('fault injection: holding the completion request', { file: HOLD_COMPLETION_RELEASE });
    this.#completionHeldLogged = true;
    return true;
  }

  /** A failure outside the barrier (a send): the same end as a failed run(). */
  async #fail(e: unknown): Promise<void> {
    if (this.#stopped) return;
    this.#log.error('incoming migration failed', { error: errorFields(e) });
    await this.#ch
      .send({ type: 'abort', code: (e as TetherError).code ?? 'ERR_DESTINATION', reason: (e as Error).message })
      .catch(() => {});
    await this.fence('destination-error', e);
  }

  async #sendCheckpoint(
    epoch: number,
    pages: DirtyPages,
    devstate: Buffer,
    disk: DiskExtent[],
    stats: {
      epoch: number;
      pauseMs: number;
      stopMs: number;
      collectMs: number;
      saveMs: number;
      contMs: number;
      inflight: number;
      guestDiskBytes: number;
    },
  ): Promise<void> {
    const tSend = nowMs();
    // The tracker left zero pages out of the data already (the wire form carries them as flags).
    const ckpt: Checkpoint = { epoch, pfns: pages.pfns, zeroMask: pages.zero, data: pages.data, disk, devstate };
    const faults = this.#opts.faults;
    // Fault injection hits DEVSTATE: every checkpoint has one, even with no dirty page.
    const inject = faults.corruptEpoch === epoch ? 'corrupt' : faults.truncateEpoch === epoch ? 'truncate' : undefined;
    let bytes = 0;
    for (const msg of checkpointMessages(ckpt, { maxPagesPerMessage: PAGES_PER_MESSAGE })) {
      if (this.#stopped) return;
      if (msg.type === 'pages') bytes += msg.data.length + msg.pfns.length * 4;
      else if (msg.type === 'disk' || msg.type === 'devstate') bytes += msg.data.length;
      else if (msg.type === 'diskzero') bytes += 24;
      if (msg.type === 'devstate' && inject) {
        this.#log.warn(`fault injection: ${inject} checkpoint`, { epoch });
        await this.#ch.sendInjected(msg, inject);
        return;
      }
      await this.#ch.send(msg);
    }
    this.#window?.sent(epoch, nowMs());
    const r2 = (v: number) => +v.toFixed(2);
    this.#log.debug('checkpoint sent', {
      epoch,
      pages: pages.pfns.length,
      bytes,
      diskBytes: disk.reduce((n, x) => n + (x.zero ? 0 : x.data.length), 0),
      // TRIM / WRITE_ZEROES: DISKZERO messages, 24 bytes each whatever the length
      diskZeroBytes: disk.reduce((n, x) => n + (x.zero ? x.length : 0), 0),
      diskExtents: disk.length,
      guestDiskBytes: stats.guestDiskBytes,
      pauseMs: r2(stats.pauseMs),
      stopMs: r2(stats.stopMs),
      collectMs: r2(stats.collectMs),
      saveMs: r2(stats.saveMs),
      contMs: r2(stats.contMs),
      sendMs: r2(nowMs() - tSend),
      // taken and unacknowledged when this one was taken (itself included)
      inflight: stats.inflight,
    });
    await this.#ch.send({
      type: 'control',
      body: {
        kind: 'epoch-stats',
        epoch,
        pauseMs: stats.pauseMs,
        pages: pages.pfns.length,
        bytes,
        collectMs: stats.collectMs,
        saveMs: stats.saveMs,
        tracker: this.#tracker!.kind,
      },
    });
  }

  /**
   * Fence when the source has gone silent (its heartbeats come every 200 ms, so
   * silence means a dead source or a cut link), or when it stays alive but
   * leaves a fully sent checkpoint unacknowledged past the failover timeout.
   * The clock never counts this side's own pause or send time, so one large
   * checkpoint does not trip it. fenceTimeoutMs < failoverTimeoutMs: this side
   * stops before the source resumes after a silence.
   */
  #checkFence(): void {
    if (this.#stopped) return;
    const now = nowMs();
    const cfg = this.vm.config.checkpoint;
    const silent = now - this.#lastHeard;
    if (this.#waitsForSource) {
      // Paused before the source may decide anything on its lease (fence < failover timeout).
      if (silent > cfg.fenceTimeoutMs) void this.#pauseForAnswer('silence');
      return;
    }
    if (silent > cfg.fenceTimeoutMs) {
      void this.fence('no-ack', new TetherError('ERR_FENCED', `nothing heard from the source for ${Math.round(silent)} ms`));
      return;
    }
    const oldest = this.#window?.oldestUnackedSentAt();
    if (oldest !== undefined && now - oldest.sentAt > cfg.failoverTimeoutMs) {
      void this.fence(
        'no-ack',
        new TetherError('ERR_FENCED', `checkpoint ${oldest.epoch} unacknowledged for ${Math.round(now - oldest.sentAt)} ms`),
      );
    }
  }

  /** The source recorded completion: the VM is this host's; its held outputs may go. */
  async #finishCompleted(epoch: number): Promise<void> {
    this.#stopped = true;
    clearInterval(this.#fenceTimer);
    clearInterval(this.#heartbeatTimer);
    // After a hold the epoch loop may wait for room no ACK will make: end it (run() ignores
    // the failure once stopped). A barrier under way ends first (its `cont`, its seal), so
    // the guest is not left stopped and pass-through comes after the last seal.
    this.#window?.fail(new TetherError('ERR_MIGRATION_ENDED', 'the source gave the rollback up'));
    this.#hashesDone.resolve();
    await this.#barrierEnd.promise;
    void this.#tracker?.close();
    this.phase.to('completed', { finalEpoch: epoch });
    if (this.#pausedForAnswer) {
      const q = this.vm.qemu;
      if (q && !q.hasExited)
        await q.qmp.execute('cont').catch((e) => this.#log.error('cont after the answer failed', { error: errorFields(e) }));
    }
    const f = this.#opts.faults;
    const holdWriteback = (f.holdWriteback || f.holdWritebackEarly) && this.#journal !== undefined;
    if (holdWriteback) {
      // A write-back of at least two extents, so the hold after the first one leaves the
      // image half written: the guest runs and keeps writing into the open epoch meanwhile.
      this.#log.warn('fault injection: waiting for two journaled extents before the write-back');
      while (this.#journal!.mode === 'journal' && this.#journal!.extentCount < 2) await sleep(10);
    }
    // In the log before the image is written: a sidecar restarted during the write-back
    // finishes it from the log (docs/journal.md).
    const marked = await this.#journal?.markCompleted(epoch).then(
      () => true,
      (e: unknown) => {
        this.#log.error('recording completion in the journal log failed', { error: errorFields(e) });
        return false;
      },
    );
    this.#outputs.passThrough();
    void this.#opts
      .onCompleted?.(this.vm)
      .catch((e: unknown) => this.#log.error('detaching the NIC relays failed', { error: errorFields(e) }));
    this.#guard?.disarm();
    this.vm.place = 'running';
    void this.#tls?.tearDown(); // not awaited: nothing below may wait on QMP
    // The completion records go only once the journal is in the image (or the log says
    // the outcome): until then a restart must not serve the image pass-through.
    if (marked === false) await this.#journal?.drained().catch(() => {});
    if (holdWriteback && f.holdWritebackEarly) {
      await this.#writeBackHeld.promise;
      this.#log.warn('fault injection: write-back held after its first extent, completion records kept', {
        extents: this.#journal!.extentCount,
      });
      await new Promise<void>(() => {}); // never: the test kills this sidecar here
    }
    await this.vm
      .dropCompletingRecords(cleanupCrashPoint(this.#opts.faults))
      .catch((e) => this.#log.error('dropping the completion records failed', { error: errorFields(e) }));
    if (holdWriteback) {
      await this.#writeBackHeld.promise;
      this.#log.warn('fault injection: write-back held after its first extent, completion records dropped', {
        extents: this.#journal!.extentCount,
      });
    }
    await this.#closeDiskWindow();
    // The source closes the channel once it has read RESOLVED; this only reaps a silent one.
    setTimeout(() => this.#ch.close(), 5000).unref();
    this.done.resolve('completed');
  }

  /**
   * The VM is this host's: its disk leaves the sidecar for QEMU's own file node (docs/disk.md,
   * "The switch"). Only after the journal's write-back is durable in the image — the file node
   * reads the image, and nothing may still be held in the sidecar — and after the source has
   * recorded completion (this runs on its answer), so the source's QEMU, a post-copy source that
   * inactivated its image at switchover, holds no lock the reopen could conflict with. A failure
   * leaves the disk on the journal's NBD export in pass-through: the guest keeps its disk.
   */
  async #closeDiskWindow(): Promise<void> {
    if (!this.#journal || !this.vm.nbd) return;
    const t0 = nowMs();
    try {
      await this.#journal.drained();
      const drainMs = Math.round((nowMs() - t0) * 100) / 100;
      const r = await this.vm.detachDiskWindow();
      this.#log.info('disk detached at completion', { drainMs, ...r });
    } catch (e) {
      this.#log.error('closing the disk window failed: the disk stays on the sidecar (pass-through)', { error: errorFields(e) });
    }
  }

  /** Stop the VM here for good and drop every held output; the source owns the VM. */
  async fence(reason: string, err?: unknown): Promise<void> {
    if (this.#stopped) return;
    if (this.#waitsForSource && !this.#rolledBack) {
      // The source may have recorded completion (or given a rollback up) already: killing
      // here could lose the VM.
      this.#log.warn('not fencing during the completion handshake; pausing until the source answers', { reason });
      await this.#pauseForAnswer(reason);
      if (reason === 'operator-abort') {
        throw new TetherError('ERR_COMPLETING', 'the completion handshake is under way; only the source decides now');
      }
      return;
    }
    this.#stopped = true;
    clearInterval(this.#fenceTimer);
    clearInterval(this.#heartbeatTimer);
    this.#log.warn('fencing: stopping the VM here, dropping held outputs', { reason, ...(err ? { error: errorFields(err) } : {}) });
    this.#outputs.discard();
    this.#window?.fail(new TetherError('ERR_FENCED', reason));
    this.#hashesDone.resolve(); // unblock a run() still waiting for the baseline
    const q = this.vm.qemu;
    if (q && !q.hasExited) {
      await Promise.race([q.qmp.execute('stop').catch(() => {}), sleep(500)]);
      await q.kill().catch(() => {});
    }
    this.#guard?.disarm();
    await this.#tls?.removeKeys(); // the object went with the QEMU
    await this.#tracker?.close().catch(() => {});
    await this.vm.removeRam().catch(() => {});
    this.vm.place = 'fenced';
    await fs.rm(completingRecordPath(this.vm), { force: true }).catch(() => {});
    await this.vm.setMigrationMarker(null).catch(() => {});
    if (this.phase.can('fenced')) this.phase.to('fenced', { reason });
    this.#ch.close();
    this.done.resolve('fenced');
  }
}
