/**
 * The destination's window of checkpoints in flight (taken, not yet acknowledged).
 *
 * Without it each barrier waits for the previous checkpoint's ACK, so a large checkpoint
 * lengthens the next epoch, the guest dirties more in it, and the next checkpoint is larger
 * still (measured: sizes doubling every epoch at full link speed). With a window of W the
 * destination takes checkpoint k+1 while up to W-1 earlier ones are still on the wire or
 * being applied; the epoch length stays the interval plus the pause.
 *
 * Rules (all checked here, I/O-free):
 *   - epochs are taken strictly in order, 1, 2, 3, …; never more than W unacknowledged;
 *   - ACK(k) acknowledges every epoch ≤ k (the source applies strictly in order and acks
 *     only what is durable, so ACK(k) implies k-1, k-2, … are durable too); an ACK of an
 *     epoch not in flight is refused (null) and changes nothing;
 *   - once failed (fencing), nothing is acknowledged any more and every waiter is rejected.
 * The caller releases outputs with the epoch ack() returns: EpochOutputs.release(k) lets
 * every epoch ≤ k out, in order.
 */
import { TetherError } from '../errors.ts';
import { MAX_CHECKPOINT_WINDOW } from '../epoch/limits.ts';
import { ignored } from '../util/log.ts';

interface Entry {
  epoch: number;
  /** When its last message was handed to the channel; undefined while still sending. */
  sentAt: number | undefined;
  acked: { promise: Promise<void>; resolve: () => void; reject: (e: Error) => void };
}

interface Waiter {
  cond: () => boolean;
  resolve: () => void;
  reject: (e: Error) => void;
}

function waiter(): Entry['acked'] {
  let resolve!: () => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // Handled here once, so that a rejection nobody awaits yet is no unhandled rejection; whoever awaits it sees it.
  promise.catch(ignored(undefined, 'a window waiter rejected before anyone awaited it'));
  return { promise, resolve, reject };
}

export class CheckpointWindow {
  readonly size: number;
  /** Oldest first; epochs consecutive. */
  readonly #inflight: Entry[] = [];
  #lastTaken = 0;
  #lastAcked = 0;
  #failed: Error | null = null;
  /** Waiting for room (an ACK) or for the window to drain. */
  #waiters: Waiter[] = [];

  constructor(size: number, lastAcked = 0) {
    if (!Number.isSafeInteger(size) || size < 1 || size > MAX_CHECKPOINT_WINDOW) {
      throw new TetherError('ERR_WINDOW', `checkpoint window must be an integer in [1, ${MAX_CHECKPOINT_WINDOW}], got ${size}`);
    }
    this.size = size;
    this.#lastTaken = lastAcked;
    this.#lastAcked = lastAcked;
  }

  /** Highest epoch acknowledged (0: none yet). */
  get lastAcked(): number {
    return this.#lastAcked;
  }

  /** Highest epoch taken (0: none yet). */
  get lastTaken(): number {
    return this.#lastTaken;
  }

  /** Epochs taken and not acknowledged, oldest first. */
  get inflight(): number[] {
    return this.#inflight.map((e) => e.epoch);
  }

  get hasRoom(): boolean {
    return this.#failed === null && this.#inflight.length < this.size;
  }

  /** Resolves once another checkpoint may be taken; rejects once the window failed. */
  room(): Promise<void> {
    return this.#wait(() => this.#inflight.length < this.size);
  }

  /** Resolves once every checkpoint taken so far is acknowledged; rejects once the window failed. */
  drained(): Promise<void> {
    return this.#wait(() => this.#inflight.length === 0);
  }

  /**
   * Enters the next epoch (lastTaken + 1, which the caller has just sealed) into the window.
   * ERR_WINDOW when it is full or failed: the caller must wait for room() first.
   */
  take(epoch: number): Promise<void> {
    if (this.#failed) throw new TetherError('ERR_WINDOW', `take(${epoch}) after the window failed: ${this.#failed.message}`);
    if (epoch !== this.#lastTaken + 1) {
      throw new TetherError('ERR_WINDOW', `take(${epoch}) out of order: the last epoch taken is ${this.#lastTaken}`);
    }
    if (this.#inflight.length >= this.size) {
      throw new TetherError('ERR_WINDOW', `take(${epoch}) with ${this.#inflight.length} checkpoints in flight (window ${this.size})`);
    }
    const acked = waiter();
    this.#inflight.push({ epoch, sentAt: undefined, acked });
    this.#lastTaken = epoch;
    return acked.promise;
  }

  /** Checkpoint `epoch` was handed to the channel whole at `at` (ms, caller's clock). */
  sent(epoch: number, at: number): void {
    const e = this.#inflight.find((x) => x.epoch === epoch);
    if (e) e.sentAt = at;
  }

  /**
   * ACK(epoch) from the source. Returns the epoch whose outputs (and every earlier one's) may
   * now be released, or null when the ACK names no epoch in flight (duplicate, stale, from the
   * future, or after the window failed): then nothing changes.
   */
  ack(epoch: number): number | null {
    if (this.#failed) return null;
    if (this.#inflight.length === 0 || epoch < this.#inflight[0]!.epoch || epoch > this.#lastTaken) return null;
    while (this.#inflight.length > 0 && this.#inflight[0]!.epoch <= epoch) this.#inflight.shift()!.acked.resolve();
    this.#lastAcked = epoch;
    this.#wake();
    return epoch;
  }

  /**
   * When the oldest checkpoint that has been sent whole but not acknowledged was sent
   * (undefined when none): the fence clock for a source that stays alive but does not ack.
   */
  oldestUnackedSentAt(): { epoch: number; sentAt: number } | undefined {
    for (const e of this.#inflight) if (e.sentAt !== undefined) return { epoch: e.epoch, sentAt: e.sentAt };
    return undefined;
  }

  /** Fencing: nothing in flight is ever acknowledged; every waiter rejects with `err`. */
  fail(err: Error): void {
    if (this.#failed) return;
    this.#failed = err;
    for (const e of this.#inflight) e.acked.reject(err);
    const ws = this.#waiters;
    this.#waiters = [];
    for (const w of ws) w.reject(err);
  }

  #wait(cond: () => boolean): Promise<void> {
    if (this.#failed) return Promise.reject(this.#failed);
    if (cond()) return Promise.resolve();
    return new Promise((resolve, reject) => this.#waiters.push({ cond, resolve, reject }));
  }

  #wake(): void {
    const still: Waiter[] = [];
    for (const w of this.#waiters) {
      if (w.cond()) w.resolve();
      else still.push(w);
    }
    this.#waiters = still;
  }
}

/**
 * The source's side of the bound: checkpoint `epoch` may begin only while at most `window`
 * checkpoints are ahead of the last one applied (the source acks only what it applied, so
 * a destination that keeps to its window never gets further ahead). ERR_CKPT_WINDOW
 * otherwise: a peer that ignores the window would make the source buffer without bound.
 */
export function checkSourceWindow(epoch: number, applied: number, window: number): void {
  if (epoch - applied > window) {
    throw new TetherError('ERR_CKPT_WINDOW', `checkpoint ${epoch} begins with ${applied} applied (window ${window})`, {
      epoch,
      applied,
      window,
    });
  }
}
