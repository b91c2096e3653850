/**
 * What the NBD server serves: a byte-addressed block device. Two kinds plug in —
 * the raw image file (pass-through) and the block-write journal that layers one
 * epoch's writes over the image during a migration window. Every method may
 * await: a write that waits is how the journal applies back-pressure to the guest.
 */
import type { Logger } from '../util/log.ts';

export interface BlockDevice {
  /** Size in bytes, fixed for the device's life. */
  readonly size: number;
  /** Whether `trim` and `writeZeroes` are supported (advertised to the NBD client). */
  readonly canTrim: boolean;
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer, opts?: { fua?: boolean }): Promise<void>;
  /** FLUSH: every completed write is durable (or, under the journal, held for the next checkpoint). */
  flush(): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  /** `noHole`: the range must stay allocated (NBD_CMD_FLAG_NO_HOLE); without it a hole may be punched. */
  writeZeroes(offset: number, length: number, opts?: { fua?: boolean; noHole?: boolean }): Promise<void>;
  close(): Promise<void>;
  /**
   * Optional fast path: the read done now, on the caller's thread, when that needs no
   * blocking I/O (the data is in the page cache); `undefined` when it would block — then
   * the caller uses `read()`. Same result as `read()`; errors are left to `read()` too.
   * The NBD server answers cached requests this way without a thread-pool round trip.
   */
  readNow?(offset: number, length: number): Buffer | undefined;
  /** Optional fast path for a write without FUA: true when it is done now, false: use `write()`. */
  writeNow?(offset: number, data: Buffer): boolean;
  /**
   * Optional: from now on reads never serve a page this host cached before (O_DIRECT on
   * the image file). The journal asks for it: on shared storage another host writes the
   * image meanwhile (docs/journal.md).
   */
  bypassCache?(log?: Logger): void;
  /** Optional: drop this host's cached pages of the whole device (after a write-back). */
  dropCache?(): void;
}
