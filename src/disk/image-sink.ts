/**
 * The source's writer of checkpoint DISK extents: pwrite into the shared raw
 * image, fdatasync on flush. The checkpoint store calls flush() once per
 * checkpoint, after its extents and before the applied record, so an ACK
 * always follows durable disk writes. Storage model: exactly one sidecar writes
 * the image at any instant — the source until the migration completes.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { DiskExtent } from '../checkpoint/assembler.ts';
import type { DiskSink } from '../checkpoint/store.ts';
import { TetherError } from '../errors.ts';

export class ImageSink implements DiskSink {
  readonly path: string;
  #fh: FileHandle | null = null;

  constructor(imagePath: string) {
    this.path = imagePath;
  }

  async #handle(): Promise<FileHandle> {
    this.#fh ??= await open(this.path, 'r+');
    return this.#fh;
  }

  async check(extents: readonly DiskExtent[]): Promise<void> {
    const { size } = await (await this.#handle()).stat();
    for (const e of extents) this.#inRange(e.offset, e.data.length, size);
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
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done);
      if (bytesWritten <= 0) throw new TetherError('ERR_CKPT_IO', `write to ${this.path} made no progress`);
      done += bytesWritten;
    }
  }

  async flush(): Promise<void> {
    if (this.#fh) await this.#fh.datasync();
  }

  async close(): Promise<void> {
    const fh = this.#fh;
    this.#fh = null;
    await fh?.close();
  }
}
