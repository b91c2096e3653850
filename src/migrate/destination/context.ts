/**
 * What every phase of the destination side shares: its options, its phase state machine and
 * the state the phases hand to each other (the disk's journal, the checkpoint window, the
 * lease clocks, the handshake's few flags). One `DestContext` per incoming migration; the
 * phase modules beside this one (setup, switchover, epoch-loop, fence) and the destination
 * half of the completion handshake (../completion/destination.ts) are functions of it, and
 * `DestinationMigration` (../destination.ts) is their public face.
 */
import { PAGE_SIZE } from '../../checkpoint/messages.ts';
import type { HostConfig, VmConfig } from '../../config/types.ts';
import type { BlockJournal } from '../../disk/journal.ts';
import { latchOutputs, noOutputs } from '../../epoch/outputs.ts';
import type { EpochOutputs } from '../../epoch/outputs.ts';
import type { DirtyTracker } from '../../memory/dirty-tracker.ts';
import type { PeerChannel } from '../../peer/channel.ts';
import type { Logger } from '../../util/log.ts';
import { StateMachine } from '../../util/state.ts';
import { deferred, nowMs } from '../../util/time.ts';
import type { QemuGuard } from '../../vm/guard.ts';
import { VmInstance } from '../../vm/instance.ts';
import type { Faults } from '../faults.ts';
import type { StreamTls } from '../stream-tls.ts';
import type { CheckpointWindow } from '../window.ts';

/**
 * The destination's phases. `handover` and `fencing` are the two ways out, entered at the
 * moment the outcome is decided (the source answered completed / this side fences) and left
 * once the barrier under way ended (handover) or the QEMU is gone (fencing): from either on,
 * nothing of the migration may start again (no barrier, no ACK release, no heartbeat).
 */
export type DestPhase = 'preparing' | 'incoming' | 'running' | 'completing' | 'handover' | 'completed' | 'fencing' | 'fenced';

const TRANSITIONS: Record<DestPhase, readonly DestPhase[]> = {
  preparing: ['incoming', 'fencing'],
  incoming: ['running', 'fencing'],
  // running -> handover: the source gave a rollback up that it could not carry out (hold, then
  // resolve completed): the VM continues here.
  running: ['completing', 'handover', 'fencing'],
  // Asked the source to complete: only the source's answer ends this phase.
  completing: ['handover', 'fencing'],
  handover: ['completed'],
  completed: [],
  fencing: ['fenced'],
  fenced: [],
};

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

/** The state of one incoming migration, shared by its phases (see the module header). */
export class DestContext {
  readonly opts: DestinationOptions;
  readonly faults: Faults;
  readonly ch: PeerChannel;
  /** The source's id of this migration: a resolve naming another one is never acted on. */
  readonly id: string;
  readonly vm: VmInstance;
  readonly log: Logger;
  readonly phase: StateMachine<DestPhase>;
  /** Resolves with the final phase (completed or fenced) once every step of the end is done. */
  readonly done = deferred<DestPhase>();

  /** The held outputs: the NICs' gates, composed with the disk's journal once it exists (setup). */
  outputs: ReturnType<typeof latchOutputs>;
  /** The disk's block-write journal (VMs with a disk). */
  journal: BlockJournal | undefined;
  /** Kills the incoming QEMU if this sidecar dies before the migration window ends. */
  guard: QemuGuard | undefined;
  /** TLS credentials of the incoming stream (stream-tls.ts). */
  tls: StreamTls | undefined;
  /** The source's baseline hash table (HASHES), handed to the dirty tracker. */
  readonly table: Buffer;
  /** Resolved by HASHES-DONE (or by the end of the migration, to unblock run()). */
  readonly hashesDone = deferred<void>();
  tracker: DirtyTracker | undefined;
  /** Checkpoints taken and not yet acknowledged (created when the epoch loop starts). */
  window: CheckpointWindow | undefined;

  /** Last message of any kind from the source (ACKs and its heartbeats). */
  lastHeard = nowMs();
  fenceTimer: NodeJS.Timeout | undefined;
  heartbeatTimer: NodeJS.Timeout | undefined;
  /**
   * Since when the barrier has been waiting on QEMU (`stop`, the device-state save, `cont`);
   * null between barriers and during the dirty-page scan. Only a QEMU command can hang on the
   * source (a vCPU stuck on a page post-copy can no longer fetch): the scan reads allocated
   * pages of this host's RAM file only, off the main thread, and always ends, however long it
   * takes on a large VM, so it never silences the heartbeat.
   */
  barrierSince: number | null = null;
  /** Resolves when the current (or last) barrier has ended with `cont`, or the loop failed. */
  barrierEnd = deferred<void>();

  /**
   * The final epoch this side asked the source to complete (set on entering `completing`,
   * kept after it: a repeated `resolve completed` must name it). Data, not a phase.
   */
  finalEpoch: number | null = null;
  /**
   * Not a phase (it can come while `running` or `completing`, and is read after the end): the
   * source has decided to roll back and checks it can restore before fencing this side
   * (`hold`, docs/design.md "Restore before fence"). As while completing, this side then never
   * fences by kill on its own: only ABORT / resolve rolled-back fences, resolve completed means
   * the source gave the rollback up and the VM continues here; silence or a lost channel pauses.
   */
  held = false;
  /**
   * Not a phase (a state of the guest within `completing` or a hold): paused by this side
   * while waiting for the source's answer; `cont` on a completed answer.
   */
  pausedForAnswer = false;
  /** Fault injection (cut-completion=answer): the one answer dropped already. */
  answerDropped = false;
  /** Fault injection (hold-completion): the hold was logged once. */
  completionHeldLogged = false;
  /** Fault injection (hold-writeback): resolved once the write-back stopped after its first extent. */
  readonly writeBackHeld = deferred<void>();

  constructor(opts: DestinationOptions) {
    this.opts = opts;
    this.faults = opts.faults;
    this.ch = opts.channel;
    this.id = opts.migrationId;
    this.outputs = latchOutputs(opts.outputs ?? noOutputs);
    this.vm = new VmInstance(opts.host, opts.vmConfig, opts.log);
    this.log = this.vm.log.child({ role: 'destination', migrationId: this.id });
    this.phase = new StateMachine<DestPhase>('incoming migration', 'preparing', TRANSITIONS, this.log);
    this.table = Buffer.alloc((this.vm.ramBytes / PAGE_SIZE) * 8);
  }

  /**
   * The outcome is decided (handover, completed, fencing, fenced): nothing of the migration
   * may start again — no barrier, no checkpoint send, no ACK release, no heartbeat.
   */
  get stopped(): boolean {
    return this.phase.is('handover', 'completed', 'fencing', 'fenced');
  }

  /** Waiting for the source's word (completion handshake, or a hold): never fence by kill on its own. */
  get waitsForSource(): boolean {
    return this.phase.is('completing') || this.held;
  }

  /** The lease's clocks stop: no more fence checks, no more heartbeats. */
  stopTimers(): void {
    clearInterval(this.fenceTimer);
    clearInterval(this.heartbeatTimer);
  }
}
