/**
 * TAP devices. In steady state the sidecar only creates each NIC's TAP (persistent,
 * joined to its bridge, up: {@link claimTap}) and closes its fd again: QEMU opens it by
 * name (`-netdev tap,ifname=…,vnet_hdr=on`) and no guest frame passes through the sidecar.
 * TapDevice (read by a native thread in batches, written in batches) remains for the
 * benchmarks. See native/src/tap.c and docs/network.md.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import type { VmConfig } from '../config/types.ts';
import { TetherError } from '../errors.ts';
import { tapCandidates } from '../config/load.ts';
import { loadNative } from '../native.ts';

const run = promisify(execFile);

interface TapBinding {
  tapOpen(name: string, nonblock: boolean): number;
  tapClose(fd: number, remove: boolean): void;
  tapWriteBatch(fd: number, frames: readonly Buffer[]): number;
  tapStartReader(fd: number, cb: (buf: Buffer | null, lens: Uint32Array | number) => void): object;
  tapStopReader(handle: object): void;
  sockOutq(fd: number): number;
  sockInq(fd: number): number;
  peerSndbuf(pid: number, path: string, bytes: number): number;
}

const binding = (): TapBinding => loadNative() as unknown as TapBinding;

function tapError(e: unknown, what: string): TetherError {
  const ne = e as Error & { code?: string; errno?: number; syscall?: string };
  return new TetherError('ERR_TAP', `${what}: ${ne.message}`, { errno: ne.errno, syscall: ne.syscall });
}

/** `ip` with arguments (no shell): names come from validated config only. */
async function ip(args: string[]): Promise<void> {
  try {
    await run('ip', args);
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new TetherError('ERR_TAP', `ip ${args.join(' ')}: ${(err.stderr ?? err.message).trim()}`);
  }
}

/** Bytes written on socket `fd` that its peer has not read yet (TIOCOUTQ). */
export function sockOutq(fd: number): number {
  try {
    return binding().sockOutq(fd);
  } catch (e) {
    throw tapError(e, 'TIOCOUTQ');
  }
}

/** Bytes queued on socket `fd` for this end to read (FIONREAD). */
export function sockInq(fd: number): number {
  try {
    return binding().sockInq(fd);
  } catch (e) {
    throw tapError(e, 'FIONREAD');
  }
}

/**
 * Raise the send buffer of the unix stream socket process `pid` accepted on `path` (QEMU's
 * end of a relay socket) to `bytes` (SO_SNDBUFFORCE through pidfd_getfd: root). On a unix
 * stream socket the writer's send buffer, not the reader's receive buffer, bounds what
 * can queue before the writer blocks. Returns the socket's SO_SNDBUF now, or 0 when `pid`
 * has not accepted a connection on `path` (yet).
 */
export function raisePeerSndbuf(pid: number, path: string, bytes: number): number {
  try {
    // the kernel doubles the value (sk_sndbuf = 2 * val): ask for half
    return binding().peerSndbuf(pid, path, Math.max(1, Math.ceil(bytes / 2)));
  } catch (e) {
    throw tapError(e, 'SO_SNDBUFFORCE on the relay socket');
  }
}

const EBUSY = 16;

/**
 * Make sure the persistent TAP `name` exists, is in `bridge` and up; 'busy' when another
 * process (a running QEMU) holds it, 'free' when QEMU may open it now. The sidecar keeps no
 * fd: QEMU's tap backend must be its only opener.
 */
export async function ensureTap(name: string, bridge: string | null): Promise<'free' | 'busy'> {
  let state: 'free' | 'busy' = 'free';
  try {
    binding().tapClose(binding().tapOpen(name, true), false);
  } catch (e) {
    if ((e as { errno?: number }).errno !== EBUSY) throw tapError(e, `cannot open TAP ${name}`);
    state = 'busy';
  }
  if (bridge !== null) await ip(['link', 'set', 'dev', name, 'master', bridge]);
  await ip(['link', 'set', 'dev', name, 'up']);
  return state;
}

/**
 * The TAP a new QEMU of NIC `tap` opens: the first of its candidates no running QEMU
 * holds (created when absent). The VM's own QEMU holds one while a standby starts, so the
 * standby gets the other; a rollback or a boot finds the first free again.
 */
export async function claimTap(tap: string, bridge: string | null): Promise<string> {
  for (const name of tapCandidates(tap)) if ((await ensureTap(name, bridge)) === 'free') return name;
  throw new TetherError('ERR_TAP', `both TAPs of NIC ${tap} are held by running processes`, { tap });
}

/** claimTap for every NIC of `vm`, in order: the TAP names its new QEMU opens. */
export async function claimNicTaps(vm: VmConfig): Promise<string[]> {
  const out: string[] = [];
  for (const nic of vm.nics ?? []) out.push(await claimTap(nic.tap, nic.bridge));
  return out;
}

/** Take TAP `name` down (a fenced destination: nothing leaves through it any more). */
export async function tapDown(name: string): Promise<void> {
  await ip(['link', 'set', 'dev', name, 'down']);
}

export class TapDevice {
  readonly name: string;
  readonly #fd: number;
  #reader: object | undefined;
  #readerEnded: Promise<number> | undefined;
  #closed = false;

  private constructor(name: string, fd: number) {
    this.name = name;
    this.#fd = fd;
  }

  /** Raw fd (benchmarks). */
  get fd(): number {
    return this.#fd;
  }

  /**
   * Create the TAP (or attach to the existing persistent one of that name), put it in
   * `bridge` and bring it up. Idempotent across sidecar restarts.
   */
  static async open(name: string, bridge: string | null, opts: { nonblock?: boolean } = {}): Promise<TapDevice> {
    let fd: number;
    try {
      fd = binding().tapOpen(name, opts.nonblock ?? true);
    } catch (e) {
      throw tapError(e, `cannot open TAP ${name}`);
    }
    const tap = new TapDevice(name, fd);
    try {
      if (bridge !== null) await ip(['link', 'set', 'dev', name, 'master', bridge]);
      await ip(['link', 'set', 'dev', name, 'up']);
    } catch (e) {
      await tap.close(true);
      throw e;
    }
    return tap;
  }

  /**
   * Frames to the wire, in order; returns how many the kernel took. Fewer than given
   * (EAGAIN/ENOBUFS) means the rest must be written again later, not that they are lost.
   */
  write(frames: readonly Buffer[]): number {
    if (this.#closed || frames.length === 0) return 0;
    try {
      return binding().tapWriteBatch(this.#fd, frames);
    } catch (e) {
      throw tapError(e, `write to TAP ${this.name}`);
    }
  }

  /** Start the native reader: onFrames gets every batch (views into one buffer per batch). */
  startReading(onFrames: (frames: Buffer[]) => void, onEnd?: (errno: number) => void): void {
    if (this.#reader) return;
    let resolveEnd!: (errno: number) => void;
    this.#readerEnded = new Promise((r) => (resolveEnd = r));
    this.#reader = binding().tapStartReader(this.#fd, (buf, lens) => {
      if (buf === null) {
        resolveEnd(lens as number);
        onEnd?.(lens as number);
        return;
      }
      const l = lens as Uint32Array;
      const frames: Buffer[] = new Array(l.length);
      let pos = 0;
      for (let i = 0; i < l.length; i++) {
        frames[i] = buf.subarray(pos, pos + l[i]!);
        pos += l[i]!;
      }
      onFrames(frames);
    });
  }

  async stopReading(): Promise<void> {
    if (!this.#reader) return;
    binding().tapStopReader(this.#reader);
    await this.#readerEnded;
    this.#reader = undefined;
  }

  /** Take the link down: nothing leaves or arrives through it any more. */
  async down(): Promise<void> {
    await ip(['link', 'set', 'dev', this.name, 'down']);
  }

  /** Stop reading and close; `remove` deletes the device (the VM left this host). */
  async close(remove: boolean): Promise<void> {
    if (this.#closed) return;
    await this.stopReading();
    this.#closed = true;
    try {
      binding().tapClose(this.#fd, remove);
    } catch (e) {
      throw tapError(e, `close TAP ${this.name}`);
    }
  }

  /** Delete a persistent TAP by name (a VM fenced, stopped or gone; its QEMU has exited). */
  static async remove(name: string): Promise<void> {
    let fd: number;
    try {
      fd = binding().tapOpen(name, true);
    } catch {
      return; // absent (or not a TAP we can own): nothing to remove
    }
    binding().tapClose(fd, true);
  }
}
