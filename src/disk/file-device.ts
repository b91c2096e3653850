/**
 * BlockDevice over a raw image file: the pass-through disk.
 *
 * read/write are positional (pread/pwrite through libuv's thread pool), so requests
 * from a pipelining client run concurrently. FLUSH is fdatasync; a FUA write is the
 * write followed by fdatasync before it completes.
 *
 * readNow/writeNow first try preadv2/pwritev2 with RWF_NOWAIT on the caller's thread
 * (native addon): a page-cache hit completes in a few microseconds, where a thread-pool
 * round trip costs tens; anything that would block (a miss, block allocation, dirty
 * throttling) returns EAGAIN at once and goes to the pool. Requests above
 * NOWAIT_MAX_BYTES always go to the pool (a long copy would stall the event loop).
 *
 * TRIM punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE) and WRITE_ZEROES uses
 * fallocate ZERO_RANGE (or PUNCH_HOLE when the client allows holes; src/disk/zero.ts), through the native
 * addon. Where that is unavailable (addon not built, or a file system answering
 * EOPNOTSUPP, e.g. ZERO_RANGE on tmpfs) TRIM does nothing (the spec lets a server ignore
 * it) and WRITE_ZEROES writes zero bytes in 1 MiB pieces. fallocate runs synchronously
 * on the event loop: it changes extents only, no data moves.
 *
 * bypassCache() (the journal, on the destination, docs/journal.md) makes read() go
 * around this host's page cache: through a second descriptor opened O_DIRECT, with the
 * range widened to the file's direct-I/O alignment and an aligned bounce buffer, so a
 * page cached here before another host rewrote the block on shared storage is never
 * served. Where the file system refuses O_DIRECT, reads stay buffered but drop the
 * range's cached pages first (posix_fadvise DONTNEED), with a warning.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { TetherError } from '../errors.ts';
import { optionalNative } from '../native.ts';
import type { Logger } from '../util/log.ts';
import type { BlockDevice } from './block-device.ts';
import { alignedBuffer, directAlignment, directNative, POSIX_FADV_DONTNEED } from './direct-io.ts';
import { FileZeroer, writeZeroBytes } from './zero.ts';

const EOPNOTSUPP_NEG = -95;
/** Largest request tried on the event loop (copying 256 KiB takes some 20 µs). */
export const NOWAIT_MAX_BYTES = 256 * 1024;

/** Bytes transferred, or -errno (EAGAIN: would block). */
type PioNowait = (write: boolean, fd: number, buf: Uint8Array, offset: number) => number;

export interface FileBlockDeviceOptions {
  /** Open read-only (writes fail with EROFS). Default false. */
  readOnly?: boolean;
  /** Use fallocate for TRIM/WRITE_ZEROES when possible. Default true. */
  fallocate?: boolean;
  /** Offer readNow/writeNow (RWF_NOWAIT on the event loop). Default true. */
  nowait?: boolean;
  /** bypassCache() may use O_DIRECT. Default true; false (tests) takes the fallback of a file system that refuses it. */
  direct?: boolean;
}

export class FileBlockDevice implements BlockDevice {
  readonly path: string;
  readonly size: number;
  readonly canTrim = true;
  readonly #fh: FileHandle;
  readonly #readOnly: boolean;
  readonly #zeroer: FileZeroer;
  #nowait: PioNowait | undefined;
  /** RWF_NOWAIT answered EOPNOTSUPP (e.g. buffered writes on ext4): stop trying that direction. */
  #readNowait = true;
  #writeNowait = true;
  #closed = false;
  /** How read() reaches the image (bypassCache()). */
  #readPath: 'cache' | 'direct' | 'dontneed' = 'cache';
  /** The O_DIRECT descriptor ('direct') and its alignment. */
  #directFd = -1;
  #align = 1;
  readonly #directAllowed: boolean;

  private constructor(path: string, fh: FileHandle, size: number, opts: FileBlockDeviceOptions) {
    this.#directAllowed = opts.direct ?? true;
    this.path = path;
    this.#fh = fh;
    this.size = size;
    this.#readOnly = opts.readOnly ?? false;
    this.#zeroer = new FileZeroer(opts.fallocate !== false, (errno, mode) => errnoError(errno, `fallocate(${mode})`));
    this.#nowait = opts.nowait === false ? undefined : optionalNative<PioNowait>('pioNowait');
  }

  /** Opens an existing image; its current length is the device size. */
  static async open(path: string, opts: FileBlockDeviceOptions = {}): Promise<FileBlockDevice> {
    let fh: FileHandle;
    try {
      fh = await fsp.open(path, opts.readOnly ? 'r' : 'r+');
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new TetherError('ERR_DISK_OPEN', `cannot open disk image ${path}: ${err.code ?? err.message}`, { path, errno: err.code });
    }
    const st = await fh.stat();
    if (!st.isFile() && !st.isBlockDevice()) {
      await fh.close();
      throw new TetherError('ERR_DISK_OPEN', `disk image ${path} is neither a file nor a block device`, { path });
    }
    return new FileBlockDevice(path, fh, st.size, opts);
  }

  /** Whether TRIM/WRITE_ZEROES currently reach fallocate (false: emulated). */
  get usesFallocate(): boolean {
    return this.#zeroer.usesFallocate;
  }

  /** 'cache': buffered reads; 'direct': O_DIRECT; 'dontneed': buffered after dropping the range's cached pages. */
  get readPath(): 'cache' | 'direct' | 'dontneed' {
    return this.#readPath;
  }

  /** Alignment of direct reads (1 unless readPath is 'direct'). */
  get directAlign(): number {
    return this.#align;
  }

  /**
   * From now on read() (and readNow(), which then declines) never serves a page this
   * host cached earlier: O_DIRECT where the file system supports it, else fadvise
   * DONTNEED of the range before a buffered read (warned: on shared storage this narrows
   * the window for a stale page but cannot close it). Idempotent. Writes are unchanged.
   */
  bypassCache(log?: Logger): void {
    if (this.#readPath !== 'cache' || this.#closed) return;
    const native = directNative();
    if (!native) {
      log?.warn('native addon missing: the disk image is read through the page cache, which may be stale on shared storage', {
        path: this.path,
      });
      return;
    }
    // the options may forbid O_DIRECT (tests): taken as the file system's EINVAL
    let refused: string | undefined = this.#directAllowed ? undefined : 'EINVAL';
    if (refused === undefined) {
      try {
        this.#directFd = fs.openSync(this.path, fs.constants.O_RDONLY | fs.constants.O_DIRECT);
      } catch (e) {
        const err = e as NodeJS.ErrnoException;
        if (err.code !== 'EINVAL' && err.code !== 'EOPNOTSUPP') {
          throw new TetherError('ERR_DISK_OPEN', `cannot open disk image ${this.path} for direct reads: ${err.code ?? err.message}`, {
            path: this.path,
            errno: err.code,
          });
        }
        refused = err.code;
      }
    }
    if (refused !== undefined) {
      log?.warn('the disk image refuses O_DIRECT: reads drop cached pages first (fadvise DONTNEED) instead', {
        path: this.path,
        errno: refused,
      });
      this.#readPath = 'dontneed';
      return;
    }
    this.#align = directAlignment(native, this.#directFd);
    this.#readPath = 'direct';
    log?.info('disk image reads bypass the page cache (O_DIRECT)', { path: this.path, align: this.#align });
  }

  /** Drops this host's clean cached pages of the image (after a write-back and its fdatasync). */
  dropCache(): void {
    if (this.#closed) return;
    directNative()?.fadvise(this.#fh.fd, 0, 0, POSIX_FADV_DONTNEED);
  }

  #check(offset: number, length: number): void {
    if (this.#closed) throw new TetherError('ERR_DISK_CLOSED', `disk ${this.path} is closed`);
    // The NBD session checks ranges already; this is the last line: never a byte outside the image.
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new TetherError('ERR_DISK_RANGE', `range ${offset}+${length} outside the ${this.size}-byte disk`, { offset, length });
    }
  }

  #writable(): void {
    if (this.#readOnly) throw new TetherError('ERR_DISK_IO', `disk ${this.path} is read-only`, { errno: 'EROFS', path: this.path });
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.#check(offset, length);
    if (this.#readPath === 'direct') return this.#readDirect(offset, length);
    if (this.#readPath === 'dontneed' && length > 0) {
      const r = directNative()!.fadvise(this.#fh.fd, offset, length, POSIX_FADV_DONTNEED);
      if (r !== 0) throw errnoError(r, 'posix_fadvise(DONTNEED)');
    }
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const bytesRead = await pio(fs.read, this.#fh.fd, buf, done, length - done, offset + done);
      if (bytesRead === 0) {
        // The file shrank under us (it must not): read the rest as zeroes rather than stale memory.
        buf.fill(0, done);
        break;
      }
      done += bytesRead;
    }
    return buf;
  }

  /**
   * O_DIRECT read of [offset, offset + length): the range widened to whole aligned
   * blocks, read into an aligned buffer, returned as a view of it (no copy). A block
   * past the end of a file whose size is not aligned comes back short: the rest is zeroes.
   */
  async #readDirect(offset: number, length: number): Promise<Buffer> {
    const a = this.#align;
    const start = offset - (offset % a);
    const end = Math.ceil((offset + length) / a) * a;
    const span = end - start;
    const head = offset - start;
    if (span === 0) return Buffer.alloc(0);
    const buf = alignedBuffer(directNative()!, span, a);
    let done = 0;
    while (done < span) {
      const n = await pio(fs.read, this.#directFd, buf, done, span - done, start + done);
      if (n === 0) break;
      done += n;
      // A count that is not a whole number of blocks ends at the end of the file.
      if (n % a !== 0) break;
    }
    if (done < head + length) buf.fill(0, Math.max(done, head), head + length);
    return buf.subarray(head, head + length);
  }

  readNow(offset: number, length: number): Buffer | undefined {
    const pio = this.#nowait;
    // A direct read waits for the device whatever RWF_NOWAIT says: never on the event loop.
    if (this.#readPath !== 'cache') return undefined;
    if (!pio || !this.#readNowait || this.#closed || length > NOWAIT_MAX_BYTES || length === 0) return undefined;
    this.#check(offset, length);
    const buf = Buffer.allocUnsafe(length);
    const r = pio(false, this.#fh.fd, buf, offset);
    if (r === length) return buf;
    // Would block, short (partly cached), or an error: read() does it and reports errors.
    if (r === EOPNOTSUPP_NEG) this.#readNowait = false;
    return undefined;
  }

  writeNow(offset: number, data: Buffer): boolean {
    const pio = this.#nowait;
    if (!pio || !this.#writeNowait || this.#closed || this.#readOnly || data.length > NOWAIT_MAX_BYTES || data.length === 0) return false;
    this.#check(offset, data.length);
    const r = pio(true, this.#fh.fd, data, offset);
    if (r === data.length) return true;
    if (r === EOPNOTSUPP_NEG) this.#writeNowait = false;
    // A short write leaves a prefix written; write() writes the whole range again (same bytes).
    return false;
  }

  async write(offset: number, data: Buffer, opts?: { fua?: boolean }): Promise<void> {
    this.#check(offset, data.length);
    this.#writable();
    await this.#writeAll(offset, data);
    if (opts?.fua) await this.#fh.datasync();
  }

  async #writeAll(offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const bytesWritten = await pio(fs.write, this.#fh.fd, data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async flush(): Promise<void> {
    if (this.#closed) throw new TetherError('ERR_DISK_CLOSED', `disk ${this.path} is closed`);
    await this.#fh.datasync();
  }

  async trim(offset: number, length: number): Promise<void> {
    this.#check(offset, length);
    this.#writable();
    if (length === 0) return;
    this.#zeroer.fallocate(this.#fh.fd, 'PUNCH_HOLE', offset, length);
  }

  async writeZeroes(offset: number, length: number, opts?: { fua?: boolean; noHole?: boolean }): Promise<void> {
    this.#check(offset, length);
    this.#writable();
    if (length === 0) return;
    // ZERO_RANGE keeps the range allocated (honours NO_HOLE) and reads back as zeroes.
    const fd = this.#fh.fd;
    const done =
      this.#zeroer.fallocate(fd, 'ZERO_RANGE', offset, length) ||
      (!opts?.noHole && this.#zeroer.fallocate(fd, 'PUNCH_HOLE', offset, length));
    if (!done) await writeZeroBytes(length, (at, bytes) => this.#writeAll(offset + at, bytes));
    if (opts?.fua) await this.#fh.datasync();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#directFd >= 0) {
      const fd = this.#directFd;
      this.#directFd = -1;
      await new Promise<void>((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
    }
    await this.#fh.close();
  }
}

/** A failed system call of the addon (it returns the errno): ERR_DISK_IO, details.errno its name for the NBD reply. */
function errnoError(errno: number, syscall: string): TetherError {
  const codes: Record<number, string> = { 28: 'ENOSPC', 5: 'EIO', 22: 'EINVAL', 1: 'EPERM', 30: 'EROFS', 27: 'EFBIG', 122: 'EDQUOT' };
  return new TetherError('ERR_DISK_IO', `${syscall} failed: errno ${errno}`, {
    errno: codes[errno] ?? `E${errno}`,
    errnoNumber: errno,
    syscall,
  });
}

type PioFn = (
  fd: number,
  buf: Buffer,
  off: number,
  len: number,
  pos: number,
  cb: (err: NodeJS.ErrnoException | null, n: number) => void,
) => void;

/** pread/pwrite on the thread pool with one callback and one promise (FileHandle adds several layers). */
function pio(fn: PioFn, fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fn(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
