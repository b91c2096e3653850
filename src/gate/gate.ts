import { createHash } from 'node:crypto';
import { TetherError } from '../errors.ts';
import type { DiskExtent, EpochOutputs } from '../epoch/outputs.ts';
import type { Logger } from '../util/log.ts';
import { StateMachine } from '../util/state.ts';
import type { GateReserve } from './reserve.ts';

/**
 * The packet gate of one NIC: sits between the guest (QEMU's filter-redirector, through the relay of src/net/nic.ts) and the
 * wire (the TAP), on the guest→wire direction only. Wire→guest frames never pass
 * through it (inbound traffic is not an output of the VM).
 *
 *   pass       frames go to the wire at once (normal running; the source always)
 *   gated      frames are held under the current epoch; seal(k) closes epoch k;
 *              release(k) sends every held frame of epochs <= k, in order
 *   discarded  fenced: held frames are dropped and nothing ever leaves again
 *
 * I/O-free: the owner gives it three callbacks (write frames to the wire, pause or
 * resume reading from the guest, take the TAP down) and feeds it guest frames.
 */
export type GateMode = 'pass' | 'gated' | 'discarded';

const TRANSITIONS: Record<GateMode, readonly GateMode[]> = {
  pass: ['discarded'],
  gated: ['pass', 'discarded'],
  discarded: [],
};

export interface GateSinks {
  /** Frames for the wire, in order. Called synchronously; the callee must not keep `frames`. */
  toWire(frames: readonly Buffer[]): void;
  /** Back-pressure: stop (true) or resume (false) reading from QEMU's socket. */
  pauseGuest(paused: boolean): void;
  /** Fenced: take the TAP down. */
  onDiscard?(): void;
}

/** What the gate counts; the daemon maps these onto Prometheus families. */
export interface GateCounters {
  held(bytes: number, frames: number): void;
  passed(frames: number, bytes: number): void;
  released(frames: number, bytes: number): void;
  discarded(frames: number, bytes: number): void;
  backpressure(): void;
  /** Held bytes/frames beyond maxBytes/maxFrames (the reserve fell short; held anyway). */
  overBound(bytes: number, frames: number): void;
}

/**
 * One line of the release log (JSON lines), written before the frames are handed to
 * the TAP, so a capture on the wire always sees them after `at`/`mono`:
 *   {"t":"release","nic":"vm1/net0","epoch":3,"frames":2,"bytes":1128,"at":1764221000123.456,"mono":81234567.891,"hashes":["9f2c…",…]}
 *   {"t":"discard","nic":…,"epoch":4,"frames":7,"bytes":…,"at":…,"mono":…}       (held frames dropped by a fence)
 *   {"t":"mode","nic":…,"mode":"gated"|"pass"|"discarded","from":"gated","epoch":1,"at":…,"mono":…}
 *   {"t":"announce","nic":…,"frames":1,"at":…,"mono":…,"hashes":[…]}   (QEMU's RARP, written by the relay, never held)
 * `at` is wall-clock milliseconds (Unix epoch, sub-ms fraction). `mono` is
 * CLOCK_MONOTONIC in milliseconds (process.hrtime): one clock for every process of
 * the machine, not stepped or slewed, so another process (a packet capture) can
 * compare its own readings with it; `at` cannot serve that purpose, each process
 * derives it from its own start. `hashes` are the first 16 hex digits of SHA-256 over
 * each whole Ethernet frame, in release order. A frame released by passThrough()
 * carries the epoch it was held under (final epoch + 1). A mode line without `from`
 * is the gate's initial mode.
 */
export type ReleaseRecord =
  | { t: 'release'; nic: string; epoch: number; frames: number; bytes: number; at: number; mono: number; hashes: string[] }
  | { t: 'discard'; nic: string; epoch: number; frames: number; bytes: number; at: number; mono: number }
  /** QEMU's own announce (RARP), let out of the window at once by the relay (src/net/nic.ts), never held. */
  | { t: 'announce'; nic: string; frames: number; at: number; mono: number; hashes: string[] }
  | { t: 'mode'; nic: string; mode: GateMode; from?: GateMode; epoch: number; at: number; mono: number };

export const frameHash = (f: Buffer): string => createHash('sha256').update(f).digest('hex').slice(0, 16);
export const wallClockMs = (): number => performance.timeOrigin + performance.now();
/** CLOCK_MONOTONIC in milliseconds (libuv's hrtime reads it): comparable across processes. */
export const monoClockMs = (): number => Number(process.hrtime.bigint()) / 1e6;

export interface GateOptions {
  /** "vm/netN": logs, metrics, release log. */
  name: string;
  mode: 'pass' | 'gated';
  /**
   * Hard bound of held frames. Reading from the guest stops `reserve` below it (see
   * gateReserve in ./reserve.ts), so what still arrives after that fits under it.
   */
  maxBytes: number;
  maxFrames: number;
  reserve: GateReserve;
  sinks: GateSinks;
  counters?: GateCounters;
  releaseLog?: (rec: ReleaseRecord) => void;
  log?: Logger;
}

interface EpochQueue {
  epoch: number;
  frames: Buffer[];
  bytes: number;
}

export class PacketGate implements EpochOutputs {
  readonly name: string;
  readonly mode: StateMachine<GateMode>;
  readonly #o: GateOptions;
  /** Epoch whose frames are being held now (gated mode). Epoch 1 starts when the VM first runs. */
  #epoch = 1;
  /** Highest sealed epoch. */
  #sealed = 0;
  /** Held frames by epoch, oldest first; the last one may be the open (current) epoch. */
  readonly #queue: EpochQueue[] = [];
  #heldBytes = 0;
  #heldFrames = 0;
  #paused = false;
  /** Between quiesce() and seal(): read on past the pause threshold so the barrier's `stop` can complete. */
  #quiescing = false;
  /** Reading pauses when held bytes or frames reach these: the bound minus the reserve. */
  readonly #pauseBytes: number;
  readonly #pauseFrames: number;
  /** Held is above the bound now (logged once per episode). */
  #over = false;

  constructor(o: GateOptions) {
    this.#o = o;
    this.name = o.name;
    this.#pauseBytes = o.maxBytes - o.reserve.bytes;
    this.#pauseFrames = o.maxFrames - o.reserve.frames;
    if (this.#pauseBytes <= 0 || this.#pauseFrames <= 0) {
      // the config loader refuses such bounds (gateMinimum); a gate that could never pause is a bug
      throw new TetherError('ERR_CONFIG_INVALID', `gate ${o.name}: bound ${o.maxBytes} bytes/${o.maxFrames} frames is within its reserve`, {
        field: 'gate',
        maxBytes: o.maxBytes,
        maxFrames: o.maxFrames,
        reserve: { ...o.reserve },
      });
    }
    this.mode = new StateMachine<GateMode>(`gate ${o.name}`, o.mode, TRANSITIONS, o.log);
    this.mode.onChange((from, to) =>
      this.#o.releaseLog?.({ t: 'mode', nic: this.name, mode: to, from, epoch: this.#epoch, at: wallClockMs(), mono: monoClockMs() }),
    );
    this.#o.releaseLog?.({ t: 'mode', nic: this.name, mode: o.mode, epoch: this.#epoch, at: wallClockMs(), mono: monoClockMs() });
  }

  get heldBytes(): number {
    return this.#heldBytes;
  }
  get heldFrames(): number {
    return this.#heldFrames;
  }
  get currentEpoch(): number {
    return this.#epoch;
  }
  /** Whether reading from the guest is stopped for back-pressure. */
  get paused(): boolean {
    return this.#paused;
  }

  /** Frames the guest sent, in order. */
  fromGuest(frames: readonly Buffer[]): void {
    if (frames.length === 0) return;
    switch (this.mode.state) {
      case 'pass': {
        this.#o.sinks.toWire(frames);
        let bytes = 0;
        for (const f of frames) bytes += f.length;
        this.#o.counters?.passed(frames.length, bytes);
        return;
      }
      case 'discarded': {
        // a fenced VM is being stopped: what it still sends is never an output
        let bytes = 0;
        for (const f of frames) bytes += f.length;
        this.#o.counters?.discarded(frames.length, bytes);
        return;
      }
      case 'gated': {
        let q = this.#queue[this.#queue.length - 1];
        if (!q || q.epoch !== this.#epoch) {
          q = { epoch: this.#epoch, frames: [], bytes: 0 };
          this.#queue.push(q);
        }
        // Never drop: a frame already read is held, even past the bound. The pause
        // threshold sits the reserve below the bound so that this does not happen.
        const bytes0 = this.#heldBytes;
        const frames0 = this.#heldFrames;
        for (const f of frames) {
          q.frames.push(f);
          q.bytes += f.length;
          this.#heldBytes += f.length;
        }
        this.#heldFrames += frames.length;
        this.#o.counters?.held(this.#heldBytes, this.#heldFrames);
        this.#checkBound(bytes0, frames0);
        this.#maybePause();
        return;
      }
    }
  }

  /**
   * (Written for the former stream netdev; the relay of src/net/nic.ts never stops reading
   * and enforces the bound itself, so for it quiesce only lifts the pause threshold.)
   * The barrier is about to stop the VM. QEMU 7.2's stream netdev writes to its socket
   * in blocking mode from the main loop: while this side does not read, QEMU's main loop
   * (QMP included) is stuck in that write, so the barrier's query-migrate/`stop` would
   * never be answered and the held frames of the open epoch never sealed and released:
   * a deadlock. So read on until seal(): what QEMU has queued (its socket send buffer)
   * and what the guest sends until `stop` lands come in above the pause threshold,
   * inside the reserve (./reserve.ts); from seal() on the gate pauses again, as the
   * disk journal does.
   */
  quiesce(): void {
    if (!this.mode.is('gated')) return;
    this.#quiescing = true;
    if (this.#paused) {
      this.#paused = false;
      this.#o.sinks.pauseGuest(false);
    }
  }

  /** The barrier quiesce() prepared for is not coming: pause again past the threshold. */
  unquiesce(): void {
    if (!this.#quiescing) return;
    this.#quiescing = false;
    this.#maybePause();
  }

  /** Barrier, VM paused: close epoch k; frames from now on belong to k+1. */
  seal(epoch: number): Promise<DiskExtent[]> {
    if (this.mode.is('discarded')) return Promise.resolve([]);
    if (epoch !== this.#epoch) {
      return Promise.reject(
        new TetherError('ERR_GATE_EPOCH', `gate ${this.name}: seal(${epoch}) but the open epoch is ${this.#epoch}`, {
          epoch,
          open: this.#epoch,
        }),
      );
    }
    this.#sealed = epoch;
    this.#epoch = epoch + 1;
    this.#quiescing = false;
    this.#maybePause();
    return Promise.resolve([]);
  }

  /** ACK(k): every held frame of epochs <= k leaves, oldest epoch first. */
  release(epoch: number): void {
    if (this.mode.is('discarded')) return; // a fenced gate never sends again
    if (epoch > this.#sealed) {
      throw new TetherError('ERR_GATE_EPOCH', `gate ${this.name}: release(${epoch}) of an epoch not sealed (last sealed ${this.#sealed})`, {
        epoch,
        sealed: this.#sealed,
      });
    }
    while (this.#queue.length > 0 && this.#queue[0]!.epoch <= epoch) this.#releaseHead();
    this.#maybeResume();
  }

  /** Completion: everything still held leaves in order, then frames pass straight through. */
  passThrough(): void {
    if (!this.mode.is('gated')) return;
    while (this.#queue.length > 0) this.#releaseHead();
    this.#quiescing = false;
    this.mode.to('pass', { epoch: this.#epoch });
    this.#maybeResume();
  }

  /** Fence: held frames are dropped, the TAP goes down, nothing leaves any more. */
  discard(): void {
    if (this.mode.is('discarded')) return;
    for (const q of this.#queue) {
      this.#o.counters?.discarded(q.frames.length, q.bytes);
      this.#o.releaseLog?.({
        t: 'discard',
        nic: this.name,
        epoch: q.epoch,
        frames: q.frames.length,
        bytes: q.bytes,
        at: wallClockMs(),
        mono: monoClockMs(),
      });
    }
    this.#queue.length = 0;
    this.#heldBytes = 0;
    this.#heldFrames = 0;
    this.#over = false;
    this.#o.counters?.held(0, 0);
    this.mode.to('discarded', { epoch: this.#epoch });
    this.#o.sinks.onDiscard?.();
    // Read on (and drop): a QEMU blocked in its write to us could not be stopped.
    if (this.#paused) {
      this.#paused = false;
      this.#o.sinks.pauseGuest(false);
    }
  }

  #releaseHead(): void {
    const q = this.#queue.shift()!;
    this.#heldBytes -= q.bytes;
    this.#heldFrames -= q.frames.length;
    if (this.#o.releaseLog) {
      this.#o.releaseLog({
        t: 'release',
        nic: this.name,
        epoch: q.epoch,
        frames: q.frames.length,
        bytes: q.bytes,
        at: wallClockMs(),
        mono: monoClockMs(),
        hashes: q.frames.map(frameHash),
      });
    }
    this.#o.sinks.toWire(q.frames);
    this.#o.counters?.released(q.frames.length, q.bytes);
    this.#o.counters?.held(this.#heldBytes, this.#heldFrames);
  }

  /**
   * The reserve fell short (an owner that feeds the gate past its pause threshold; the
   * relay of src/net/nic.ts refuses before the bound, so there this stays 0): the frames are held anyway, because
   * dropping a held frame would break output commit's promise to TCP peers, and the
   * excess is counted and logged as an error so that it is never silent.
   */
  #checkBound(bytes0: number, frames0: number): void {
    const { maxBytes, maxFrames } = this.#o;
    const overBytes = Math.max(0, this.#heldBytes - Math.max(bytes0, maxBytes));
    const overFrames = Math.max(0, this.#heldFrames - Math.max(frames0, maxFrames));
    const over = this.#heldBytes > maxBytes || this.#heldFrames > maxFrames;
    if (overBytes > 0 || overFrames > 0) this.#o.counters?.overBound(overBytes, overFrames);
    if (over && !this.#over) {
      this.#o.log?.error('gate over its bound: frames held beyond gate.maxBytes/maxFrames (reserve too small for this guest)', {
        bytes: this.#heldBytes,
        frames: this.#heldFrames,
        maxBytes,
        maxFrames,
        quiescing: this.#quiescing,
      });
    }
    this.#over = over;
  }

  #maybePause(): void {
    if (this.#paused || this.#quiescing || !this.mode.is('gated')) return;
    if (this.#heldBytes < this.#pauseBytes && this.#heldFrames < this.#pauseFrames) return;
    this.#paused = true;
    this.#o.counters?.backpressure();
    this.#o.log?.debug('gate full: back-pressure on the guest', { bytes: this.#heldBytes, frames: this.#heldFrames });
    this.#o.sinks.pauseGuest(true);
  }

  /** Resume reading once the queue has drained to half of the pause threshold (hysteresis). */
  #maybeResume(): void {
    if (this.#heldBytes <= this.#o.maxBytes && this.#heldFrames <= this.#o.maxFrames) this.#over = false;
    if (this.#paused && this.#heldBytes <= this.#pauseBytes / 2 && this.#heldFrames <= this.#pauseFrames / 2) {
      this.#paused = false;
      this.#o.sinks.pauseGuest(false);
    }
  }
}
