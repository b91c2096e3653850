/**
 * Making a byte range of an image file read as zeroes, for the destination's device (the
 * guest's TRIM / WRITE_ZEROES, src/disk/file-device.ts) and the source's image sink
 * (DISKZERO, src/disk/image-sink.ts): fallocate ZERO_RANGE (the range stays allocated),
 * else PUNCH_HOLE (what QEMU's discard=unmap file node does), else the caller writes zero
 * bytes (writeZeroBytes). A mode the file system answers EOPNOTSUPP to (ZERO_RANGE on
 * tmpfs) is not tried again on that file; any other errno is the caller's error.
 * fallocate runs synchronously on the event loop: it changes extents only, no data moves.
 */
import { optionalNative } from '../native.ts';

// linux/falloc.h
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;
const EOPNOTSUPP = 95;
/** Largest buffer of zeroes written at once where fallocate cannot zero. */
const ZERO_CHUNK = 1024 * 1024;

type Fallocate = (fd: number, mode: number, offset: number, length: number) => number;

export type ZeroMode = 'ZERO_RANGE' | 'PUNCH_HOLE';

export class FileZeroer {
  readonly #fa: Fallocate | undefined;
  readonly #fail: (errno: number, mode: ZeroMode) => Error;
  #works: Record<ZeroMode, boolean> = { ZERO_RANGE: true, PUNCH_HOLE: true };

  /** `useFallocate` false: always zero bytes (tests of the fallback). `fail` builds the caller's error for an errno. */
  constructor(useFallocate: boolean, fail: (errno: number, mode: ZeroMode) => Error) {
    // without the addon: zero bytes are written instead
    this.#fa = useFallocate ? optionalNative<Fallocate>('fallocate') : undefined;
    this.#fail = fail;
  }

  /** Whether some fallocate mode may still work on this file (false: zero bytes only). */
  get usesFallocate(): boolean {
    return this.#fa !== undefined && (this.#works.ZERO_RANGE || this.#works.PUNCH_HOLE);
  }

  /** true when the range now reads as zeroes; false when this mode cannot be used here. */
  fallocate(fd: number, mode: ZeroMode, offset: number, length: number): boolean {
    const fa = this.#fa;
    if (!fa || !this.#works[mode]) return false;
    const flags = (mode === 'ZERO_RANGE' ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE) | FALLOC_FL_KEEP_SIZE;
    const r = fa(fd, flags, offset, length);
    if (r === 0) return true;
    if (r !== EOPNOTSUPP) throw this.#fail(r, mode);
    this.#works[mode] = false;
    return false;
  }
}

/** Writes `length` zero bytes through `write(at, bytes)` (relative offsets), at most 1 MiB at a time. */
export async function writeZeroBytes(length: number, write: (at: number, bytes: Buffer) => Promise<void>): Promise<void> {
  const zeroes = Buffer.alloc(Math.min(ZERO_CHUNK, length));
  for (let at = 0; at < length; at += zeroes.length) await write(at, zeroes.subarray(0, Math.min(zeroes.length, length - at)));
}
