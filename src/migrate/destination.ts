/**
 * The destination side of a migration: runs the incoming QEMU and, from the moment the VM
 * runs here, the epoch loop, until the source's answer to the completion request hands the
 * VM to this host, or this side fences. The phases live beside this file, one a file:
 *   destination/context.ts     the shared state and the phase machine (DestPhase)
 *   destination/setup.ts       journal for the disk, incoming QEMU + guard, TLS, port, READY
 *   destination/switchover.ts  wait until the guest runs here, start the lease
 *   destination/epoch-loop.ts  barrier (stop, scan, device state, seal, cont), send checkpoint k
 *   destination/fence.ts       the lease watch, fence, failure -> ABORT + fence
 *   completion/destination.ts  this side of the completion handshake (docs/completion.md)
 * This class routes the source's messages to them and is what the daemon holds.
 */
import type { Message } from '../peer/messages.ts';
import { remoteError, TetherError } from '../errors.ts';
import { asPeerControl } from '../peer/control.ts';
import { nowMs } from '../util/time.ts';
import type { StateMachine } from '../util/state.ts';
import type { VmInstance } from '../vm/instance.ts';
import { answerFault, decideResolve, finishCompleted, onHold, pauseForAnswer, sendResolved } from './completion/destination.ts';
import type { Resolve } from './completion/destination.ts';
import type { ResolveAnswer } from './completion/protocol.ts';
import { DestContext } from './destination/context.ts';
import type { DestinationOptions, DestPhase } from './destination/context.ts';
import { runEpochs } from './destination/epoch-loop.ts';
import { failMigration, fence } from './destination/fence.ts';
import { setUp } from './destination/setup.ts';
import { switchover } from './destination/switchover.ts';

export type { DestinationOptions, DestPhase } from './destination/context.ts';
export { completingRecordPath, staleResolve } from './completion/destination.ts';
export type { ResolveAnswer, ResolveRefusal } from './completion/protocol.ts';

/**
 * One incoming migration (see the module header). Up to checkpoint.window checkpoints are in
 * flight at once; with no ACK for fenceTimeoutMs it fences itself: stops the VM and drops
 * every held output.
 */
export class DestinationMigration {
  readonly #ctx: DestContext;

  constructor(opts: DestinationOptions) {
    this.#ctx = new DestContext(opts);
  }

  get phase(): StateMachine<DestPhase> {
    return this.#ctx.phase;
  }
  get vm(): VmInstance {
    return this.#ctx.vm;
  }
  /** The source's id of this migration: a resolve naming another one is never acted on. */
  get id(): string {
    return this.#ctx.id;
  }
  /** Resolves with the final phase (completed or fenced) once the migration's end is done. */
  get done(): DestContext['done'] {
    return this.#ctx.done;
  }
  /** Highest epoch the source has acknowledged (its outputs are released); 0 before any. */
  get ackedEpoch(): number {
    return this.#ctx.window?.lastAcked ?? 0;
  }

  /** Handle a message from the source (the daemon routes the channel here). */
  onMessage(m: Message): void {
    const ctx = this.#ctx;
    ctx.lastHeard = nowMs();
    switch (m.type) {
      case 'hashes': {
        const end = m.startPfn * 8 + m.hashes.length;
        if (end > ctx.table.length) {
          void this.fence('bad-hashes', new TetherError('ERR_PEER_PROTOCOL', 'HASHES beyond the end of guest RAM'));
          return;
        }
        m.hashes.copy(ctx.table, m.startPfn * 8);
        return;
      }
      case 'control':
        this.#onControl(m.body);
        return;
      case 'ack': {
        // A late ACK after fencing must not let a held output out (latchOutputs would refuse it too).
        if (ctx.stopped) return;
        // ACK(k) means k is durable on the source, which applies strictly in order: every
        // epoch <= k is, and release(k) lets their outputs out, oldest first.
        const k = ctx.window?.ack(m.epoch) ?? null;
        if (k !== null) ctx.outputs.release(k);
        else ctx.log.warn('unexpected ACK', { epoch: m.epoch, inflight: ctx.window?.inflight ?? [] });
        return;
      }
      case 'nack':
        void this.fence('nack', remoteError(m.code, m.message));
        return;
      case 'abort':
        // S sends ABORT only when it rolls back: during the handshake (or a hold) that is its answer.
        void fence(ctx, 'source-abort', remoteError(m.code, m.reason), ctx.waitsForSource);
        return;
      case 'heartbeat':
        return;
      default:
        ctx.log.warn('unexpected message from source', { type: m.type });
    }
  }

  /** CONTROL from the source on the migration channel: HASHES-DONE, a hold, or its answer. */
  #onControl(body: Record<string, unknown>): void {
    const ctx = this.#ctx;
    try {
      const c = asPeerControl(body);
      if (c.kind === 'hashes-done') ctx.hashesDone.resolve();
      else if (c.kind === 'hold') onHold(ctx, c.migrationId);
      else if (c.kind === 'resolve' && !answerFault(ctx, c)) sendResolved(ctx, c, this.resolve(c));
    } catch (e) {
      void this.fence('bad-control-message', e);
    }
  }

  /** Channel to the source is gone: no ACK can come any more. */
  onChannelClosed(err: Error | undefined): void {
    const ctx = this.#ctx;
    if (ctx.waitsForSource && !ctx.stopped) {
      // The answer may still come, on a channel the source opens to this host's peer port.
      void pauseForAnswer(ctx, 'peer-channel-closed');
      return;
    }
    if (!ctx.stopped) void this.fence('peer-channel-closed', err);
  }

  /**
   * The source's answer to this side's completion request (on the migration channel or on a
   * new one): see decideResolve. Acts on it (fence or finish) and returns RESOLVED's answer.
   */
  resolve(c: Resolve): ResolveAnswer {
    const d = decideResolve(this.#ctx, c);
    if (d.act === 'fence') void fence(this.#ctx, 'source-rolled-back', undefined, true);
    else if (d.act === 'finish') void finishCompleted(this.#ctx, c.epoch);
    return d.answer;
  }

  async run(): Promise<void> {
    const ctx = this.#ctx;
    ctx.barrierEnd.resolve(); // no barrier yet
    try {
      await setUp(ctx);
      // Switchover: from the first instant the VM runs here, outputs are held (epoch 1).
      if (!(await switchover(ctx))) return;
      await runEpochs(ctx);
    } catch (e) {
      ctx.barrierEnd.resolve();
      await failMigration(ctx, e);
    }
  }

  /** Stop the VM here for good and drop every held output; the source owns the VM. */
  fence(reason: string, err?: unknown): Promise<void> {
    return fence(this.#ctx, reason, err);
  }
}
