/**
 * One guest NIC on this host: QEMU's stream netdev socket on one side, the TAP on the
 * other, the packet gate on the guest→wire path.
 *
 *   guest → wire: socket data → FrameDecoder → PacketGate → TAP (batched write)
 *   wire → guest: TAP reader thread (batches) → length-prefixed → socket
 *
 * QEMU is the stream server; this side connects and reconnects whenever the connection
 * ends (QEMU restarted by a rollback, QEMU re-listening after a sidecar restart), so the
 * guest keeps its NIC. While nobody is connected QEMU drops the guest's frames (7.2 marks
 * the netdev link_down internally): lost, never leaked.
 */
import { appendFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import net from 'node:net';
import type { NicConfig } from '../config/types.ts';
import { encodeFrames, FrameDecoder } from '../gate/codec.ts';
import { PacketGate } from '../gate/gate.ts';
import { GATE_SOCKET_HWM, gateReserve } from '../gate/reserve.ts';
import type { GateCounters, ReleaseRecord } from '../gate/gate.ts';
import type { Logger } from '../util/log.ts';
import { errorFields } from '../util/log.ts';
import { deferred } from '../util/time.ts';
import { TapDevice } from './tap.ts';

/** Wire→guest frames are dropped (counted) while this much is queued towards QEMU: a full NIC ring. */
const MAX_TO_GUEST_QUEUE = 1 << 20;
/** Reconnect delay: short first (a rollback's fresh QEMU must get its NIC back quickly), then at most 100 ms. */
const reconnectDelay = (failures: number): number => Math.min(100, 10 * 2 ** Math.min(failures, 4));

/** Shortest frame the TAP takes: an Ethernet header (tun answers EINVAL to anything shorter). */
export const MIN_FRAME_BYTES = 14;

/**
 * Guest frames dropped by the sidecar, never passed on: `runt` shorter than an Ethernet
 * header; `framing` the stream lost its framing (an empty or oversized frame: the
 * connection is dropped and QEMU re-listens); `tap_error` the TAP refused a write with an
 * error other than EAGAIN/ENOBUFS (the batch is dropped, counted whole).
 */
export type NicDropReason = 'runt' | 'framing' | 'tap_error';

export interface NicCounters extends GateCounters {
  toGuest(frames: number, bytes: number): void;
  toGuestDropped(frames: number): void;
  /** Frames written to the TAP on a retry, after it had refused them (EAGAIN/ENOBUFS). */
  tapRetry(frames: number): void;
  /** Guest frames dropped as malformed or refused by the TAP (see NicDropReason). */
  dropped?(reason: NicDropReason, frames: number): void;
}

export interface NicPortOptions {
  vm: string;
  index: number;
  nic: NicConfig;
  socketPath: string;
  mode: 'pass' | 'gated';
  bounds: { maxBytes: number; maxFrames: number };
  /** The VM's checkpoint.window: barriers that can read on before an ACK (the gate's reserve). */
  checkpointWindow: number;
  /** JSON-lines release log file (the harness compares it with a capture), or none. */
  releaseLogFile?: string;
  counters?: NicCounters;
  log: Logger;
}

export class NicPort {
  readonly name: string;
  readonly gate: PacketGate;
  readonly #o: NicPortOptions;
  readonly #log: Logger;
  #tap: TapDevice | undefined;
  #sock: net.Socket | undefined;
  #connected = false;
  #connectWaiters: (() => void)[] = [];
  #closed = false;
  #timer: NodeJS.Timeout | undefined;
  #tapDown = false;
  #failures = 0;
  #suspended = false;
  /** The gate is full: it asked to stop reading QEMU's socket. */
  #gatePaused = false;
  /** Frames the TAP did not take yet (EAGAIN/ENOBUFS), in order; retried before anything newer. */
  #tapBacklog: Buffer[] = [];
  #tapRetry: NodeJS.Timeout | undefined;
  #tapRetries = 0;
  /** Frames dropped so far, by reason (for the log's rate limit; the metric counts them too). */
  readonly #drops: Record<NicDropReason, number> = { runt: 0, framing: 0, tap_error: 0 };

  constructor(o: NicPortOptions) {
    this.#o = o;
    this.name = `${o.vm}/net${o.index}`;
    this.#log = o.log.child({ nic: this.name, tap: o.nic.tap });
    const logFile = o.releaseLogFile;
    if (logFile) mkdirSync(path.dirname(logFile), { recursive: true, mode: 0o700 });
    const releaseLog = logFile ? (r: ReleaseRecord) => appendFileSync(logFile, JSON.stringify(r) + '\n') : undefined;
    this.gate = new PacketGate({
      name: this.name,
      mode: o.mode,
      maxBytes: o.bounds.maxBytes,
      maxFrames: o.bounds.maxFrames,
      reserve: gateReserve(o.checkpointWindow),
      log: this.#log,
      ...(o.counters ? { counters: o.counters } : {}),
      ...(releaseLog ? { releaseLog } : {}),
      sinks: {
        toWire: (frames) => this.#toWire(frames),
        pauseGuest: (paused) => {
          this.#gatePaused = paused;
          this.#applyPause();
        },
        onDiscard: () => {
          this.#tapDown = true;
          void this.#tap?.down().catch((e: unknown) => this.#log.warn('TAP down failed', { error: errorFields(e) }));
        },
      },
    });
  }

  get connected(): boolean {
    return this.#connected;
  }

  /** Create/attach the TAP and start connecting to QEMU's socket (QEMU may start later). */
  async open(): Promise<void> {
    this.#tap = await TapDevice.open(this.#o.nic.tap, this.#o.nic.bridge);
    this.#tap.startReading((frames) => this.#toGuest(frames));
    this.#log.info('NIC attached', { bridge: this.#o.nic.bridge, mode: this.gate.mode.state });
    this.#connect();
  }

  /** Resolves once connected to QEMU (or rejects after timeoutMs). */
  waitConnected(timeoutMs: number): Promise<void> {
    if (this.#connected) return Promise.resolve();
    const d = deferred<void>();
    const t = setTimeout(() => d.reject(new Error(`${this.name}: QEMU's NIC socket not connected after ${timeoutMs} ms`)), timeoutMs);
    this.#connectWaiters.push(() => {
      clearTimeout(t);
      d.resolve();
    });
    return d.promise;
  }

  /**
   * Stop connecting to QEMU until resume(). A rollback suspends the port before it kills
   * the old QEMU and resumes it once the restored one runs: QEMU 7.2 crashed (SIGSEGV)
   * when the stream client connected while it was still loading the device state.
   */
  suspend(): void {
    this.#suspended = true;
    clearTimeout(this.#timer);
    const s = this.#sock;
    this.#sock = undefined;
    this.#connected = false;
    s?.destroy();
  }

  resume(): void {
    if (!this.#suspended) return;
    this.#suspended = false;
    this.#failures = 0;
    if (!this.#sock && !this.#closed) this.#connect();
  }

  #connect(): void {
    if (this.#closed || this.#suspended) return;
    // The high-water mark is part of the gate's reserve: Node reads up to it past pause().
    // (net.Socket passes it on to stream.Duplex; @types/node does not list it.)
    const opts: net.NetConnectOpts & { readableHighWaterMark: number } = {
      path: this.#o.socketPath,
      readableHighWaterMark: GATE_SOCKET_HWM,
    };
    const sock = net.createConnection(opts);
    const dec = new FrameDecoder();
    this.#sock = sock;
    sock.on('connect', () => {
      this.#connected = true;
      this.#failures = 0;
      if (this.#gatePaused || this.#tapBacklog.length > 0) sock.pause();
      this.#log.info('connected to QEMU stream netdev', { socket: this.#o.socketPath });
      for (const w of this.#connectWaiters.splice(0)) w();
    });
    sock.on('data', (chunk) => {
      let frames: Buffer[];
      try {
        frames = dec.push(chunk);
      } catch (e) {
        // framing lost: drop this connection; QEMU re-listens and we start clean
        this.#log.error('stream netdev framing error: reconnecting', { error: errorFields(e) });
        this.#o.counters?.dropped?.('framing', 1);
        sock.destroy();
        return;
      }
      // A guest can send anything: a frame the TAP would refuse never enters the gate.
      if (frames.some((f) => f.length < MIN_FRAME_BYTES)) {
        const ok = frames.filter((f) => f.length >= MIN_FRAME_BYTES);
        this.#dropped('runt', frames.length - ok.length);
        frames = ok;
      }
      if (frames.length > 0) this.gate.fromGuest(frames);
    });
    sock.on('error', () => {});
    sock.on('close', () => {
      if (this.#sock !== sock) return;
      if (this.#connected) this.#log.warn('QEMU stream netdev disconnected: reconnecting');
      this.#connected = false;
      this.#sock = undefined;
      if (!this.#closed && !this.#suspended) this.#timer = setTimeout(() => this.#connect(), reconnectDelay(this.#failures++));
    });
  }

  /** Reading QEMU's socket stops while the gate is full or the TAP has a backlog. */
  #applyPause(): void {
    if (this.#gatePaused || this.#tapBacklog.length > 0) this.#sock?.pause();
    else this.#sock?.resume();
  }

  /**
   * Frames for the wire, in order. A frame the TAP does not take now is kept and written
   * again (1, 2, 4 … 64 ms later) before anything newer, and reading from QEMU stops
   * meanwhile: a released frame is never dropped on this side.
   */
  #toWire(frames: readonly Buffer[]): void {
    const tap = this.#tap;
    if (!tap || this.#tapDown) return;
    if (this.#tapBacklog.length > 0) {
      this.#tapBacklog.push(...frames);
      return;
    }
    const n = this.#tapWrite(tap, frames);
    if (n === frames.length) return;
    this.#tapBacklog = frames.slice(n);
    this.#tapRetries = 0;
    this.#applyPause();
    this.#scheduleTapRetry();
  }

  #scheduleTapRetry(): void {
    this.#tapRetry = setTimeout(
      () => {
        const tap = this.#tap;
        if (!tap || this.#tapDown || this.#closed) {
          this.#tapBacklog = [];
          return;
        }
        const n = this.#tapWrite(tap, this.#tapBacklog);
        this.#tapBacklog = this.#tapBacklog.slice(n);
        this.#o.counters?.tapRetry(n);
        if (this.#tapBacklog.length > 0) {
          this.#tapRetries++;
          this.#scheduleTapRetry();
        } else this.#applyPause();
      },
      Math.min(64, 2 ** this.#tapRetries),
    );
  }

  /**
   * TapDevice.write, never throwing: a write error other than EAGAIN/ENOBUFS drops the
   * batch (counted; how much of it went out before the error is unknown) and returns its
   * length, as if written. A handler must never throw: it would take the sidecar down.
   */
  #tapWrite(tap: TapDevice, frames: readonly Buffer[]): number {
    try {
      return tap.write(frames);
    } catch (e) {
      this.#dropped('tap_error', frames.length, e);
      return frames.length;
    }
  }

  #dropped(reason: NicDropReason, frames: number, err?: unknown): void {
    this.#o.counters?.dropped?.(reason, frames);
    // Logged at 1, 2, 4, 8 ... drops of a kind: a guest sending garbage cannot flood the log.
    const before = this.#drops[reason];
    const after = (this.#drops[reason] = before + frames);
    if (Math.floor(Math.log2(after)) !== Math.floor(Math.log2(Math.max(1, before))) || before === 0) {
      this.#log.warn('guest frames dropped', { reason, frames, total: after, ...(err ? { error: errorFields(err) } : {}) });
    }
  }

  #toGuest(frames: Buffer[]): void {
    const s = this.#sock;
    if (!s || !this.#connected || s.writableLength > MAX_TO_GUEST_QUEUE) {
      this.#o.counters?.toGuestDropped(frames.length);
      return;
    }
    const buf = encodeFrames(frames);
    s.write(buf);
    this.#o.counters?.toGuest(frames.length, buf.length - 4 * frames.length);
  }

  /** Stop for good; `remove` deletes the TAP (the VM left this host), else it persists. */
  async close(remove: boolean): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    clearTimeout(this.#tapRetry);
    this.#sock?.destroy();
    this.#sock = undefined;
    this.#connected = false;
    await this.#tap?.close(remove).catch((e: unknown) => this.#log.warn('TAP close failed', { error: errorFields(e) }));
    this.#log.info(remove ? 'NIC removed' : 'NIC detached');
  }
}
