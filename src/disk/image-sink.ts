/**
 * The source's writer of checkpoint DISK extents: pwrite into the shared raw
 * image, fdatasync on flush. The checkpoint store calls flush() once per
 * checkpoint, after its extents and before the applied record, so an ACK
 * always follows durable disk writes. Storage model: exactly one sidecar writes
 * the image at any instant — the source until the migration completes.
 *
 * Zero extents (DISKZERO: the guest's TRIM / WRITE_ZEROES on the destination) are
 * applied as fallocate(ZERO_RANGE) where the file system has it, else
 * fallocate(PUNCH_HOLE) (what QEMU's discard=unmap file node does for a discard), else
 * by writing zero bytes: either way the range reads back as zeroes, exactly what the
 * guest was shown on the destination. After the fdatasync this host's clean cached
 * pages of the image are dropped: no buffered reader here may later see them once
 * another host wrote the image (docs/journal.md).
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { DiskSink } from '../checkpoint/store.ts';
import { extentLength, type DiskExtent } from '../epoch/outputs.ts';
import { TetherError } from '../errors.ts';
import { directNative, POSIX_FADV_DONTNEED } from './direct-io.ts';
import { FileZeroer, writeZeroBytes } from './zero.ts';

export interface ImageSinkOptions {
  /** Use fallocate for zero extents when possible. Default true (false: tests of the fallback). */
  fallocate?: boolean;
}

export class ImageSink implements DiskSink {
  readonly path: string;
  #fh: FileHandle | null = null;
  readonly #zeroer: FileZeroer;
  /** How zero extents were applied, for tests and logs. */
  readonly stats = { zeroRange: 0, punchHole: 0, zeroBytesWritten: 0 };

  constructor(imagePath: string, opts: ImageSinkOptions = {}) {
    this.path = imagePath;
    this.#zeroer = new FileZeroer(opts.fallocate !== false, (errno, mode) => fallocateError(errno, mode, imagePath));
  }

  async #handle(): Promise<FileHandle> {
    this.#fh ??= await open(this.path, 'r+');
    return this.#fh;
  }

  async check(extents: readonly DiskExtent[]): Promise<void> {
    const { size } = await (await this.#handle()).stat();
    for (const e of extents) this.#inRange(e.offset, extentLength(e), size);
  }

  #inRange(offset: number, length: number, size: number): void {
    if (offset + length > size) {
      // Never grow the image: an extent past its end is not a write the guest could have made.
      throw new TetherError('ERR_DISK_RANGE', `disk extent [${offset}, +${length}) past the end of ${this.path} (${size} bytes)`);
    }
  }

  async pwrite(offset: number, data: Buffer): Promise<void> {
    const fh = await this.#handle();
    this.#inRange(offset, data.length, (await fh.stat()).size);
    await this.#writeAll(fh, offset, data);
  }

  async #writeAll(fh: FileHandle, offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done);
      if (bytesWritten <= 0) throw new TetherError('ERR_CKPT_IO', `write to ${this.path} made no progress`);
      done += bytesWritten;
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    const fh = await this.#handle();
    this.#inRange(offset, length, (await fh.stat()).size);
    if (length === 0) return;
    if (this.#zeroer.fallocate(fh.fd, 'ZERO_RANGE', offset, length)) {
      this.stats.zeroRange++;
      return;
    }
    if (this.#zeroer.fallocate(fh.fd, 'PUNCH_HOLE', offset, length)) {
      this.stats.punchHole++;
      return;
    }
    await writeZeroBytes(length, (at, bytes) => this.#writeAll(fh, offset + at, bytes));
    this.stats.zeroBytesWritten += length;
  }

  async flush(): Promise<void> {
    if (!this.#fh) return;
    await this.#fh.datasync();
    directNative()?.fadvise(this.#fh.fd, 0, 0, POSIX_FADV_DONTNEED);
  }

  async close(): Promise<void> {
    const fh = this.#fh;
    this.#fh = null;
    await fh?.close();
  }
}

function fallocateError(errno: number, mode: string, path: string): TetherError {
  return new TetherError('ERR_CKPT_IO', `fallocate(${mode}) on ${path} failed: errno ${errno}`, { errno, path });
}
