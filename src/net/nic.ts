/**
 * One guest NIC on this host: its packet gate and, inside a destination's post-copy
 * window only, the relay between QEMU's filter-redirectors and the gate.
 *
 * Steady state (every VM not inside a destination's window): QEMU's own tap backend on
 * the persistent TAP the sidecar created (src/net/tap.ts); nothing passes through here,
 * and a sidecar that dies or restarts changes nothing the guest sees.
 *
 * The window (destination, from QEMU's start until completion is recorded):
 *
 *   guest → QEMU r0 (outdev) → out socket → RelayDecoder → PacketGate → in socket → QEMU r1 (indev) → tap
 *
 * The relay reads the out socket ALWAYS: QEMU writes it in blocking mode from its main
 * loop, so a relay that stops reading stalls QMP and the vCPUs. What the gate cannot hold
 * (its bound, in every phase; docs/network.md "Bounds") is refused: dropped and counted
 * (`gate_full`), as a full NIC ring would; never a held frame. Wire → guest frames never
 * pass through here (the tap delivers them to the guest directly).
 */
import { appendFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import net from 'node:net';
import type { NicConfig } from '../config/types.ts';
import { frameHash, monoClockMs, PacketGate, wallClockMs } from '../gate/gate.ts';
import type { GateCounters, ReleaseRecord } from '../gate/gate.ts';
import { TetherError } from '../errors.ts';
import { relayIds, type NicRelayPaths } from '../qemu/cmdline.ts';
import { chardevRemove, objectDel, type QmpExecutor } from '../qemu/commands.ts';
import type { Logger } from '../util/log.ts';
import { errorFields, ignored } from '../util/log.ts';
import { deferred, nowMs } from '../util/time.ts';
import { RelayDecoder, encodeRecords, type RelayRecord } from './relay.ts';
import { tapCandidates } from '../config/load.ts';
import { pauseReading, socketFd, type ReadPause } from './read-pause.ts';
import { raisePeerSndbuf, sockOutq, tapDown, TapDevice } from './tap.ts';

/** Reconnect delay: short first, then at most 100 ms. */
const reconnectDelay = (failures: number): number => Math.min(100, 10 * 2 ** Math.min(failures, 4));
/**
 * How long the detach at completion waits for each drain step before it removes the filters
 * anyway (what is then still on its way to QEMU is counted as `relay_error`). Generous: a
 * loaded host's QEMU reads the in socket slowly, and only a QEMU that stopped reading for
 * good should ever reach it.
 */
const DETACH_STEP_MS = 30_000;
/** Tries (every SNDBUF_RETRY_MS) to find QEMU's accepted end of the out socket and raise its send buffer. */
const SNDBUF_TRIES = 100;
const SNDBUF_RETRY_MS = 20;

/**
 * Guest frames dropped by the relay, never passed on: `runt` shorter than an Ethernet
 * header; `malformed` a header length other than 12; `framing` the stream lost its framing
 * (the connection is dropped, QEMU re-listens); `gate_full` refused at the gate's bound;
 * `relay_error` a frame for the wire that QEMU's in socket could not take (not connected,
 * or more than the gate's byte bound queued towards it).
 */
export type NicDropReason = 'runt' | 'malformed' | 'framing' | 'gate_full' | 'relay_error';
export const NIC_DROP_REASONS: readonly NicDropReason[] = ['runt', 'malformed', 'framing', 'gate_full', 'relay_error'];

export interface NicCounters extends GateCounters {
  /** Guest frames dropped (see NicDropReason). */
  dropped?(reason: NicDropReason, frames: number): void;
  /** QEMU's own announce frames, let out at once. */
  announced?(frames: number): void;
}

export interface NicPortOptions {
  vm: string;
  index: number;
  nic: NicConfig;
  mode: 'pass' | 'gated';
  bounds: { maxBytes: number; maxFrames: number };
  /** The VM's checkpoint.window: barriers that can read on before an ACK (the gate's reserve). */
  checkpointWindow: number;
  /** The window's relay sockets (QEMU listens on them); none in steady state. */
  relay?: NicRelayPaths;
  /** JSON-lines release log file (the harness compares it with a capture), or none. */
  releaseLogFile?: string;
  /**
   * A hook for tests of a stalled sidecar, set by the caller (never in production): stop
   * reading the out socket once, from the first read after epoch `epoch` was sealed, for
   * `ms` or until more than `bytes` are queued in it, whichever comes first.
   */
  pauseReading?: ReadPause;
  /** For a control test, set by the caller: leave QEMU's out-socket send buffer at the kernel default. */
  keepQemuSndbuf?: boolean;
  counters?: NicCounters;
  log: Logger;
}

interface Conn {
  out: net.Socket;
  in: net.Socket;
  dec: RelayDecoder;
  outEnded: Promise<void>;
  /** Frames written to `in` whose bytes Node has not yet handed to the kernel. */
  unflushed: number;
}

export class NicPort {
  readonly name: string;
  readonly gate: PacketGate;
  readonly #o: NicPortOptions;
  readonly #log: Logger;
  readonly #releaseLog: ((r: ReleaseRecord) => void) | undefined;
  #conn: Conn | undefined;
  #connected = false;
  #connectWaiters: (() => void)[] = [];
  #closed = false;
  #detached = false;
  /** detach() under way: the out socket's EOF is expected and must not end the in socket. */
  #detaching = false;
  #timer: NodeJS.Timeout | undefined;
  #timer2: NodeJS.Timeout | undefined;
  #failures = 0;
  #qemuPid: (() => number | undefined) | undefined;
  /** SO_SNDBUF of QEMU's end of the out socket once raised (0: not raised). */
  #qemuSndbuf = 0;
  /** The pauseReading hook fired (it fires once). */
  #paused = false;
  /** Frames dropped so far, by reason (for the log's rate limit; the metric counts them too). */
  readonly #drops: Record<NicDropReason, number> = { runt: 0, malformed: 0, framing: 0, gate_full: 0, relay_error: 0 };

  constructor(o: NicPortOptions) {
    this.#o = o;
    this.name = `${o.vm}/net${o.index}`;
    this.#log = o.log.child({ nic: this.name, tap: o.nic.tap });
    const logFile = o.releaseLogFile;
    if (logFile) mkdirSync(path.dirname(logFile), { recursive: true, mode: 0o700 });
    const releaseLog = logFile ? (r: ReleaseRecord) => appendFileSync(logFile, JSON.stringify(r) + '\n') : undefined;
    this.#releaseLog = releaseLog;
    this.gate = new PacketGate({
      name: this.name,
      mode: o.mode,
      maxBytes: o.bounds.maxBytes,
      maxFrames: o.bounds.maxFrames,
      // The relay refuses what would exceed the bound itself (#flush), in every phase
      // (a barrier's quiesce included): no reserve is needed below the bound.
      reserve: { bytes: 1, frames: 1 },
      log: this.#log,
      ...(o.counters ? { counters: o.counters } : {}),
      ...(releaseLog ? { releaseLog } : {}),
      sinks: {
        toWire: (frames) => this.#toWire(frames),
        // The gate's pause threshold (its bound less a 1-byte/1-frame reserve) and its
        // hysteresis are not used: #flush refuses exactly what would not fit under the bound.
        pauseGuest: () => {},
        onDiscard: () => {
          for (const t of tapCandidates(o.nic.tap)) void tapDown(t).catch(ignored(this.#log, 'an absent TAP has nothing to take down'));
        },
      },
    });
  }

  /** Whether the relay is connected (always true for a port without relay). */
  get connected(): boolean {
    return this.#o.relay === undefined || this.#connected;
  }

  /**
   * Start connecting the relay to QEMU's sockets (QEMU must be started); nothing without
   * relay. `qemuPid`: the window's QEMU, whose end of the out socket gets a send buffer as
   * large as the gate's byte bound, so that a sidecar that does not read for a while does
   * not block QEMU until the guest has queued that much (docs/network.md "Bounds").
   */
  open(qemuPid?: () => number | undefined): Promise<void> {
    this.#qemuPid = qemuPid;
    if (this.#o.relay) this.#connect();
    return Promise.resolve();
  }

  /** Resolves once the relay is connected to QEMU (or rejects after timeoutMs). */
  waitConnected(timeoutMs: number): Promise<void> {
    if (this.connected) return Promise.resolve();
    const d = deferred<void>();
    const t = setTimeout(
      () => d.reject(new TetherError('ERR_RELAY_CONNECT', `${this.name}: QEMU's relay sockets not connected after ${timeoutMs} ms`)),
      timeoutMs,
    );
    this.#connectWaiters.push(() => {
      clearTimeout(t);
      d.resolve();
    });
    return d.promise;
  }

  #connect(): void {
    const relay = this.#o.relay;
    if (this.#closed || this.#detached || !relay) return;
    const outS = net.createConnection({ path: relay.out });
    const inS = net.createConnection({ path: relay.in });
    const ended = deferred<void>();
    const c: Conn = { out: outS, in: inS, dec: new RelayDecoder(), outEnded: ended.promise, unflushed: 0 };
    this.#conn = c;
    let up = 0;
    const onUp = (): void => {
      if (++up < 2 || this.#conn !== c) return;
      this.#connected = true;
      this.#failures = 0;
      this.#log.info('relay connected to QEMU', { out: relay.out, in: relay.in });
      for (const w of this.#connectWaiters.splice(0)) w();
      this.#raiseQemuSndbuf(c, 0);
    };
    outS.on('connect', onUp);
    inS.on('connect', onUp);
    outS.on('data', (chunk) => this.#fromQemu(c, chunk));
    outS.on('end', () => ended.resolve());
    outS.on('close', () => ended.resolve());
    // a socket error (QEMU gone) ends the connection (onClose reconnects); frames it cost are counted at write time
    outS.on('error', ignored(this.#log, "QEMU's out socket failed: the relay reconnects"));
    inS.on('error', ignored(this.#log, "QEMU's in socket failed: the relay reconnects"));
    const onClose = (): void => {
      // During detach the out socket ends by design (chardev-remove); the in socket still
      // carries the last released frames to QEMU, and detach() ends it once they are read.
      if (this.#conn !== c || this.#detaching) return;
      if (this.#connected) this.#log.warn('relay disconnected from QEMU: reconnecting');
      this.#connected = false;
      this.#conn = undefined;
      outS.destroy();
      inS.destroy();
      if (!this.#closed && !this.#detached) this.#timer = setTimeout(() => this.#connect(), reconnectDelay(this.#failures++));
    };
    outS.on('close', onClose);
    inS.on('close', onClose);
  }

  /** SO_SNDBUF of QEMU's end of the out socket (0 until raised; the kernel default then applies). */
  get qemuSndbuf(): number {
    return this.#qemuSndbuf;
  }

  /**
   * QEMU accepts the relay's connection from its main loop, after our connect completed:
   * look for its end until it is there, then raise its send buffer to the gate's byte
   * bound. A failure is logged and leaves the kernel default (the bound on a sidecar
   * stall is then what that default buffers).
   */
  #raiseQemuSndbuf(c: Conn, tries: number): void {
    const pid = this.#qemuPid?.();
    const relay = this.#o.relay;
    if (!pid || !relay || this.#conn !== c || this.#closed || this.#detached || this.#o.keepQemuSndbuf) return;
    let got = 0;
    try {
      got = raisePeerSndbuf(pid, relay.out, this.#o.bounds.maxBytes);
    } catch (e) {
      this.#log.warn("relay: cannot raise QEMU's socket send buffer: a sidecar stall blocks QEMU once the default buffer is full", {
        error: errorFields(e),
      });
      return;
    }
    if (got > 0) {
      this.#qemuSndbuf = got;
      this.#log.info("relay: QEMU's out socket send buffer raised", { sndbuf: got });
    } else if (tries < SNDBUF_TRIES) {
      this.#timer2 = setTimeout(() => this.#raiseQemuSndbuf(c, tries + 1), SNDBUF_RETRY_MS);
    } else this.#log.warn("relay: QEMU's end of the out socket not found; its send buffer stays the default");
  }

  /** The pauseReading hook: stop reading once, from the first read after its epoch was sealed. */
  #maybePauseReading(c: Conn): void {
    const p = this.#o.pauseReading;
    if (!p || this.#paused || this.gate.currentEpoch <= p.epoch) return;
    this.#paused = true;
    pauseReading(
      c.out,
      p,
      () => this.gate.currentEpoch,
      () => this.#qemuSndbuf,
      this.#log,
    );
  }

  /** The guest's frames from QEMU's out socket. Never throws, never stops reading (but for the pauseReading hook). */
  #fromQemu(c: Conn, chunk: Buffer): void {
    this.#maybePauseReading(c);
    let recs: RelayRecord[];
    try {
      recs = c.dec.push(chunk);
    } catch (e) {
      this.#dropped('framing', 1, e);
      c.out.destroy(); // QEMU re-listens; the next connection starts clean
      return;
    }
    const frames: Buffer[] = [];
    for (const r of recs) {
      switch (r.kind) {
        case 'frame':
          frames.push(r.frame);
          break;
        case 'announce':
          // QEMU's RARP, no guest state in it: it leaves at once (after what is already
          // batched for the gate, so the order of the guest's own frames is kept)
          this.#flush(frames);
          this.#releaseLog?.({
            t: 'announce',
            nic: this.name,
            frames: 1,
            at: wallClockMs(),
            mono: monoClockMs(),
            hashes: [frameHash(r.frame)],
          });
          this.#write([r.frame]);
          this.#o.counters?.announced?.(1);
          break;
        case 'runt':
        case 'malformed':
          this.#dropped(r.kind, 1);
          break;
      }
    }
    this.#flush(frames);
  }

  /**
   * Into the gate, or refused when holding them would take the gate past its bound (or it
   * is at its pause threshold): a guest's burst is cut at the bound, as a full NIC ring cuts it.
   */
  #flush(frames: Buffer[]): void {
    if (frames.length === 0) return;
    const g = this.gate;
    let bytes = 0;
    for (const f of frames) bytes += f.length;
    const { maxBytes, maxFrames } = this.#o.bounds;
    if (g.mode.is('gated') && (g.heldFrames + frames.length > maxFrames || g.heldBytes + bytes > maxBytes)) {
      // what still fits goes in, in order; the rest of the batch is refused
      let n = 0;
      let b = 0;
      while (n < frames.length && g.heldFrames + n + 1 <= maxFrames && g.heldBytes + b + frames[n]!.length <= maxBytes)
        b += frames[n++]!.length;
      if (n > 0) g.fromGuest(frames.slice(0, n));
      this.#dropped('gate_full', frames.length - n);
    } else g.fromGuest(frames.slice());
    frames.length = 0;
  }

  /** Frames the gate lets out: to QEMU's in socket (r1 sends them to the tap). */
  #toWire(frames: readonly Buffer[]): void {
    this.#write(frames);
  }

  #write(frames: readonly Buffer[]): void {
    const c = this.#conn;
    const s = c?.in;
    if (!c || !s || !this.#connected || s.destroyed || s.writableLength > this.#o.bounds.maxBytes) {
      this.#dropped('relay_error', frames.length);
      return;
    }
    const n = frames.length;
    c.unflushed += n;
    try {
      // The callback runs once the bytes are in the kernel (QEMU reads them from there), or
      // with an error when the socket went first: then they never reach QEMU, and count.
      s.write(encodeRecords(frames), (err) => {
        c.unflushed -= n;
        if (err) this.#dropped('relay_error', n, err);
      });
    } catch (e) {
      c.unflushed -= n;
      this.#dropped('relay_error', n, e);
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

  /** Dropped frames so far, by reason (tests). */
  get drops(): Readonly<Record<NicDropReason, number>> {
    return this.#drops;
  }

  /**
   * Completion (the gate passes everything through already): take the relay out of QEMU's
   * path with no frame lost. `object-del` r0 (new guest frames go to the tap directly);
   * `chardev-remove` its socket, so the relay reads EOF after QEMU's last frame; once
   * everything read was written to the in socket and QEMU has read it all (TIOCOUTQ 0),
   * `object-del` r1 (deleting it earlier would strand bytes in the socket). Returns the
   * time from the first to the last command, ms.
   */
  async detach(qmp: QmpExecutor): Promise<number> {
    if (!this.#o.relay || this.#detached) return 0;
    this.#detaching = true;
    const id = relayIds(this.#o.index);
    const t0 = nowMs();
    const c = this.#conn;
    const step = (what: string, ok: () => boolean): Promise<void> => detachStep(`${this.name}: ${what}`, ok);
    try {
      await objectDel(qmp, id.outFilter);
      await chardevRemove(qmp, id.outDev);
      if (c) {
        let eof = false;
        void c.outEnded.then(() => (eof = true));
        await step('EOF on the out socket', () => eof);
        const fd = socketFd(c.in);
        // (a destroyed in socket: QEMU went away; what it had not read is counted below)
        await step(
          'QEMU reading the in socket',
          () => c.in.destroyed || (c.unflushed === 0 && c.in.writableLength === 0 && (fd === undefined || sockOutq(fd) === 0)),
        );
      }
    } catch (e) {
      const fd = socketFd(c?.in);
      // frames still in the relay's buffer are counted (relay_error) when the socket goes
      // below; bytes QEMU never read from the kernel's buffer are lost with r1: logged
      this.#log.error('relay detach did not drain: removing the filters anyway', {
        error: errorFields(e),
        unflushedFrames: c?.unflushed ?? 0,
        unreadBytes: fd === undefined ? null : sockOutq(fd),
      });
    } finally {
      this.#detached = true;
      this.#detaching = false;
      await objectDel(qmp, id.inFilter).catch((e: unknown) => this.#log.error('object-del failed', { error: errorFields(e) }));
      await chardevRemove(qmp, id.inDev).catch(ignored(this.#log, "the in chardev may be gone already (QEMU's filter held it)"));
      clearTimeout(this.#timer);
      clearTimeout(this.#timer2);
      this.#conn = undefined;
      this.#connected = false;
      c?.out.destroy();
      c?.in.destroy();
    }
    const ms = Math.round((nowMs() - t0) * 100) / 100;
    this.#log.info('relay detached: QEMU sends to the tap directly', { detachMs: ms });
    return ms;
  }

  /** Stop for good; `remove` deletes the NIC's TAPs (the VM left this host and its QEMU exited). */
  async close(remove: boolean): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    clearTimeout(this.#timer2);
    this.#conn?.out.destroy();
    this.#conn?.in.destroy();
    this.#conn = undefined;
    this.#connected = false;
    if (remove) await removeNicTaps(this.#o.nic.tap).catch((e: unknown) => this.#log.warn('TAP removal failed', { error: errorFields(e) }));
    this.#log.info(remove ? 'NIC removed' : 'NIC detached');
  }
}

/** Polls `ok` every millisecond until it holds; ERR_RELAY_DETACH after DETACH_STEP_MS. */
async function detachStep(what: string, ok: () => boolean): Promise<void> {
  const until = nowMs() + DETACH_STEP_MS;
  while (!ok()) {
    if (nowMs() > until) throw new TetherError('ERR_RELAY_DETACH', `${what} not done after ${DETACH_STEP_MS} ms`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** Delete both TAPs of a NIC (absent ones, or ones a live QEMU still holds, are left). */
export async function removeNicTaps(tap: string): Promise<void> {
  for (const t of tapCandidates(tap)) await TapDevice.remove(t);
}

/**
 * Remove a window's filters a crashed sidecar left in a QEMU that runs the VM here now
 * (completion was recorded but the relay was not detached): without a relay they drop
 * every guest frame. Absent filters (the usual case) are not an error.
 */
export async function dropStaleRelays(qmp: QmpExecutor, nics: number, log?: Logger): Promise<void> {
  const absent = ignored(log, 'no stale relay filter or chardev (the usual case)');
  for (let i = 0; i < nics; i++) {
    const id = relayIds(i);
    await objectDel(qmp, id.outFilter).catch(absent);
    await objectDel(qmp, id.inFilter).catch(absent);
    await chardevRemove(qmp, id.outDev).catch(absent);
    await chardevRemove(qmp, id.inDev).catch(absent);
  }
}
