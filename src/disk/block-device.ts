/**
 * What the NBD server serves: a byte-addressed block device. Two kinds plug in —
 * the raw image file (pass-through) and the block-write journal that layers one
 * epoch's writes over the image during a migration window. Every method may
 * await: a write that waits is how the journal applies back-pressure to the guest.
 */
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
}
