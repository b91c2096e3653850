/**
 * What every phase of a source migration shares: its options, its phase machine, the state
 * the phases hand each other (channel, store, standby, applied epoch, figures) and the small
 * helpers they all use (timers, progress, control waiters, the final result). The phases
 * themselves live beside this file: setup.ts, switchover.ts, apply.ts, rollback.ts, and the
 * source half of the completion handshake in ../completion/source.ts.
 */
import type { CheckpointAssembler } from '../../checkpoint/assembler.ts';
import type { Message } from '../../peer/messages.ts';
import type { CheckpointStore } from '../../checkpoint/store.ts';
import type { HostConfig } from '../../config/types.ts';
import type { ImageSink } from '../../disk/image-sink.ts';
import { TetherError } from '../../errors.ts';
import { newMigrationId } from '../../epoch/id.ts';
import type { TetherMetrics } from '../../metrics/registry.ts';
import type { PeerChannel } from '../../peer/channel.ts';
import type { PeerControl } from '../../peer/control.ts';
import type { Logger } from '../../util/log.ts';
import { ignored } from '../../util/log.ts';
import { StateMachine } from '../../util/state.ts';
import { StreamingSummary } from '../../util/summary.ts';
import { deferred, Nap, nowMs } from '../../util/time.ts';
import type { VmInstance } from '../../vm/instance.ts';
import type { Faults } from '../faults.ts';
import { round, summarize } from '../result.ts';
import type { MigrationResult, RollbackFigures } from '../result.ts';
import type { HotStandby } from '../standby.ts';
import type { StreamTls } from '../stream-tls.ts';
import { openSourceStore } from './restore.ts';

export type SourcePhase =
  | 'connecting'
  | 'prepared'
  | 'unreached'
  | 'refused'
  | 'precopy'
  | 'switchover'
  | 'postcopy'
  | 'completing'
  | 'completed'
  | 'rolling-back'
  | 'rolled-back'
  | 'failed'
  | 'continued-on-destination'
  | 'detached';

/**
 * A phase in this list is "live": no decision is taken yet. Leaving it is the decision (roll
 * back, complete, refused, unreached, detached), taken once: from then on no ACK is sent.
 */
export const LIVE_PHASES: readonly SourcePhase[] = ['connecting', 'prepared', 'precopy', 'switchover', 'postcopy'];

export const SOURCE_TRANSITIONS: Record<SourcePhase, readonly SourcePhase[]> = {
  // unreached: no tether peer answered; refused: the destination refused `prepare` (or this
  // side refused its answer). Either way nothing changed anywhere: an error, not a rollback.
  // detached: the sidecar shuts down mid-migration, deciding nothing (recovery resolves it).
  connecting: ['prepared', 'rolling-back', 'unreached', 'refused', 'detached'],
  // prepared: the destination answered `ready`; from here on its ABORT means roll back.
  prepared: ['precopy', 'rolling-back', 'refused', 'detached'],
  unreached: [],
  precopy: ['switchover', 'rolling-back', 'detached'],
  switchover: ['postcopy', 'rolling-back', 'detached'],
  postcopy: ['completing', 'rolling-back', 'detached'],
  // completing: the destination asked to own the VM; the durable record is being written.
  // A record that fails leaves the VM ours: roll back.
  completing: ['completed', 'rolling-back'],
  // continued-on-destination: the rollback could not restore here and the destination was
  // reachable: given up (recorded durably), the VM continues there.
  'rolling-back': ['rolled-back', 'failed', 'continued-on-destination'],
  'continued-on-destination': [],
  completed: [],
  'rolled-back': [],
  failed: [],
  refused: [],
  detached: [],
};

export const HEARTBEAT_MS = 200;

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

/** The shared state of one source migration, handed to each phase. */
export class SourceRun {
  readonly phase: StateMachine<SourcePhase>;
  /**
   * This migration's id (control.ts MIGRATION_ID_RE), chosen here and sent in `prepare`: every
   * answer and record about this migration names it, so none is taken for another of the VM.
   */
  readonly id = newMigrationId();
  /** The VM's logger, every line naming this migration. */
  readonly log: Logger;
  readonly opts: SourceOptions;
  readonly faults: Faults;
  readonly vm: VmInstance;
  readonly store: CheckpointStore;
  /** Where checkpoint DISK extents go: this side writes the shared image until completion. */
  readonly diskSink: ImageSink | undefined;
  readonly result = deferred<MigrationResult>();
  readonly t0 = nowMs();
  channel: PeerChannel | undefined;
  assembler: CheckpointAssembler | undefined;
  /** Applies run in order, one after the other; a rollback waits for the one under way. */
  applyChain: Promise<void> = Promise.resolve();
  lastHeard = nowMs();
  appliedEpoch: number | null = null;
  switchoverAt: number | null = null;
  /**
   * Set just before migrate-continue: from then on the source QEMU may have handed the VM
   * over. Not a phase: it is a fact about QEMU that the rollback (whose phase is then
   * rolling-back whatever came before) needs to choose between cancelling and restoring.
   */
  continued = false;
  /**
   * Final epoch once completion is recorded durably (a completion or a given-up rollback):
   * from then on this side never rolls back. A value, not a phase: a repeated request is
   * answered with it.
   */
  completedEpoch: number | null = null;
  /** Streaming: a long migration takes millions of checkpoints. */
  readonly pauses = new StreamingSummary();
  readonly ckptBytes = new StreamingSummary();
  tracker: string | null = null;
  lastPauseMs: number | null = null;
  /** A QEMU waiting (-incoming defer) to take over on rollback; see standby.ts. */
  standby: HotStandby | undefined;
  /**
   * After the decision to roll back: the destination ended the migration itself or the
   * channel is gone. A fact about the peer, learnt in any phase: not a phase of this side.
   */
  destinationGone = false;
  /** A NACK for a bad checkpoint, sent with the ABORT that fences the destination (not before). */
  nack: Message | undefined;
  /** The ABORT went out (or the channel was closed): the destination fences. A fact about the peer, as above. */
  fenced = false;
  /** TLS credentials of the migration stream on this QEMU (stream-tls.ts). */
  tls: StreamTls | undefined;
  /** hold-acks-ms (fault injection): when the hold ends, once armed. */
  readonly ackHold: { until?: number } = {};
  /** The ACK hold's sleep (fault injection); a decision cuts it short. */
  readonly holdAcksNap = new Nap();
  #timers: NodeJS.Timeout[] = [];
  readonly #controlWaiters = new Map<string, (c: PeerControl) => void>();

  constructor(opts: SourceOptions) {
    this.opts = opts;
    this.faults = opts.faults ?? {};
    this.vm = opts.vm;
    this.log = this.vm.log.child({ migrationId: this.id });
    this.phase = new StateMachine<SourcePhase>('migration', 'connecting', SOURCE_TRANSITIONS, this.log);
    const f = this.faults;
    const failEpoch = f.failApplySticky ?? f.failApplyEpoch;
    const { store, sink } = openSourceStore(
      this.vm,
      failEpoch !== undefined ? { epoch: failEpoch, sticky: f.failApplySticky !== undefined } : undefined,
    );
    this.store = store;
    this.diskSink = sink;
  }

  /** No decision taken yet (see LIVE_PHASES). */
  get live(): boolean {
    return this.phase.is(...LIVE_PHASES);
  }

  every(ms: number, fn: () => void): void {
    this.#timers.push(setInterval(fn, ms));
  }

  stopTimers(): void {
    for (const t of this.#timers) clearInterval(t);
    this.#timers = [];
    this.holdAcksNap.wake();
  }

  /** A heartbeat on `ch` naming the last applied epoch; a lost one is covered by the next. */
  heartbeat(ch: PeerChannel): void {
    ch.send({ type: 'heartbeat', epoch: this.appliedEpoch ?? 0, sentAt: Date.now() }).catch(
      ignored(this.log, 'a heartbeat on a closing channel'),
    );
  }

  progress(p: Record<string, unknown>): void {
    this.opts.onProgress?.({ t: round(nowMs() - this.t0), migrationId: this.id, ...p });
  }

  /** Resolves with the destination's next control message of `kind`; rejects on timeout or once decided. */
  waitControl(kind: PeerControl['kind'], timeoutMs: number): Promise<PeerControl> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#controlWaiters.delete(kind);
        reject(new TetherError('ERR_PEER_TIMEOUT', `destination did not answer '${kind}' within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#controlWaiters.set(kind, (c) => {
        clearTimeout(timer);
        if (!this.live) reject(new TetherError('ERR_MIGRATION_ENDED', 'migration ended'));
        else resolve(c);
      });
    });
  }

  /** Hands a control message to whoever waits for its kind. */
  deliverControl(c: PeerControl): void {
    const w = this.#controlWaiters.get(c.kind);
    if (w) {
      this.#controlWaiters.delete(c.kind);
      w(c);
    }
  }

  /** After a decision: every waiter is released (and rejects, the migration being decided). */
  releaseWaiters(): void {
    for (const w of this.#controlWaiters.values()) w({ kind: 'hashes-done', pages: -1 });
    this.#controlWaiters.clear();
  }

  finish(p: {
    outcome: MigrationResult['outcome'];
    reason?: string;
    err?: unknown;
    rollback?: RollbackFigures;
    handover?: MigrationResult['handover'];
  }): void {
    void this.standby?.discard(); // a no-op once promoted
    void this.tls?.tearDown(); // key files gone already; the object goes with a killed QEMU
    void this.applyChain.then(() => this.diskSink?.close()).catch(ignored(this.log, 'the image sink closes with its descriptor gone'));
    // a completion keeps its marker until the destination confirmed (see completion/source.ts)
    if (p.outcome !== 'completed')
      void this.vm.setMigrationMarker(null).catch(ignored(this.log, 'a marker left behind is resolved at the next start'));
    const m = this.opts.metrics;
    m?.migrations.inc({ role: 'source', outcome: p.outcome });
    if (p.rollback) {
      m?.rollbacks.inc({ reason: p.reason ?? 'unknown' });
      if (p.outcome === 'rolled-back') m?.restore.observe(p.rollback.restoreMs / 1000);
    }
    const err = p.err as { code?: string; message?: string } | undefined;
    this.result.resolve({
      vm: this.vm.name,
      migrationId: this.id,
      outcome: p.outcome,
      ...(p.reason ? { reason: p.reason } : {}),
      ...(err ? { error: { code: err.code ?? 'ERR_UNKNOWN', message: err.message ?? String(err) } } : {}),
      totalMs: round(nowMs() - this.t0),
      switchoverMs: this.switchoverAt === null ? null : round(this.switchoverAt - this.t0),
      checkpoints: this.ckptBytes.count,
      appliedEpoch: this.appliedEpoch,
      tracker: this.tracker,
      pauseMs: summarize(this.pauses),
      checkpointBytes: this.#checkpointBytes(),
      ...(p.rollback ? { rollback: p.rollback } : {}),
      ...(p.handover ? { handover: p.handover } : {}),
    });
  }

  #checkpointBytes(): MigrationResult['checkpointBytes'] {
    const b = this.ckptBytes;
    if (b.count === 0) return null;
    return { avg: Math.round(b.sum / b.count), p50: Math.round(b.quantile(50)), max: b.max, total: b.sum };
  }
}
