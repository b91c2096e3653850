/**
 * Assembles checkpoint transactions on S. Pure: no I/O.
 *
 * States: idle --BEGIN(expectEpoch)--> pages --DISK--> disk --DEVSTATE--> devstate
 *         --COMMIT(verified)--> idle (expectEpoch + 1)
 * PAGES is allowed in `pages`, DISK and DISKZERO in `pages`/`disk`, DEVSTATE once, COMMIT only after
 * DEVSTATE. Any error discards the open transaction (expectEpoch unchanged) and returns the
 * assembler to idle; nothing of a failed transaction is ever returned.
 */
import { TetherError } from '../errors.ts';
import type { ErrorCode } from '../errors.ts';
import type { DiskExtent } from '../epoch/outputs.ts';
import { CheckpointDigest, DIGEST_SIZE } from './codec.ts';
import { MAX_DISK_ZERO_BYTES, PAGE_SIZE, type CheckpointMessage, type OtherFrame } from './messages.ts';

/** A verified checkpoint, ready to apply. */
export interface Checkpoint {
  epoch: number;
  /** Page frame numbers, distinct, each < ramPages. */
  pfns: Uint32Array;
  /** One byte per pfns entry: 1 = zero page, 0 = its data is in `data`. */
  zeroMask: Uint8Array;
  /** PAGE_SIZE bytes per non-zero entry, in pfns order. */
  data: Buffer;
  /** Disk writes of the epoch, in issue order (later extents win where they overlap). */
  disk: DiskExtent[];
  devstate: Buffer;
}

export interface AssemblerOptions {
  ramPages: number;
  /** Upper bound on the payload bytes (PAGES + DISK + DEVSTATE) one transaction may hold. */
  maxCheckpointBytes: number;
  /** Epoch the next BEGIN must carry (the last applied epoch + 1). */
  expectEpoch: number;
}

type State = 'idle' | 'pages' | 'disk' | 'devstate';

interface Transaction {
  epoch: number;
  digest: CheckpointDigest;
  bytes: number;
  pages: number;
  pfnChunks: Uint32Array[];
  zeroChunks: Uint8Array[];
  dataChunks: Buffer[];
  disk: DiskExtent[];
  diskBytes: number;
  devstate: Buffer | null;
}

function ckptError(code: ErrorCode, message: string, details?: Record<string, unknown>): TetherError {
  return new TetherError(code, message, details);
}

export class CheckpointAssembler {
  private readonly ramPages: number;
  private readonly maxCheckpointBytes: number;
  private expect: number;
  private state: State = 'idle';
  private tx: Transaction | null = null;
  /** One bit per guest page: set while that pfn is in the open transaction. */
  private readonly seen: Uint8Array;

  constructor(opts: AssemblerOptions) {
    if (!Number.isSafeInteger(opts.ramPages) || opts.ramPages <= 0 || opts.ramPages > 2 ** 32) {
      throw new TetherError('ERR_CKPT_INVALID_OPTION', 'ramPages must be an integer in [1, 2^32]');
    }
    if (!Number.isSafeInteger(opts.expectEpoch) || opts.expectEpoch < 1) {
      throw new TetherError('ERR_CKPT_INVALID_OPTION', 'expectEpoch must be an integer >= 1');
    }
    if (!Number.isSafeInteger(opts.maxCheckpointBytes) || opts.maxCheckpointBytes < 0) {
      throw new TetherError('ERR_CKPT_INVALID_OPTION', 'maxCheckpointBytes must be a non-negative integer');
    }
    this.ramPages = opts.ramPages;
    this.maxCheckpointBytes = opts.maxCheckpointBytes;
    this.expect = opts.expectEpoch;
    this.seen = new Uint8Array(Math.ceil(opts.ramPages / 8));
  }

  /** Epoch the next BEGIN must carry. */
  get expectEpoch(): number {
    return this.expect;
  }

  /** Epoch of the open transaction, or null. */
  get openEpoch(): number | null {
    return this.tx?.epoch ?? null;
  }

  /** Drops an open transaction (e.g. when the connection is lost). */
  reset(): void {
    if (this.tx !== null) {
      for (const chunk of this.tx.pfnChunks) {
        for (const pfn of chunk) this.seen[pfn >>> 3]! &= ~(1 << (pfn & 7));
      }
    }
    this.tx = null;
    this.state = 'idle';
  }

  /**
   * Consumes one checkpoint message. Returns the verified checkpoint on its COMMIT, null
   * otherwise. Throws ERR_CKPT_* (and discards the open transaction) on any violation.
   */
  accept(msg: CheckpointMessage | OtherFrame): Checkpoint | null {
    try {
      return this.step(msg);
    } catch (e) {
      this.reset();
      throw e;
    }
  }

  private step(msg: CheckpointMessage | OtherFrame): Checkpoint | null {
    if (msg.type === 'begin') return this.begin(msg.epoch);
    if (msg.type !== 'pages' && msg.type !== 'disk' && msg.type !== 'diskzero' && msg.type !== 'devstate' && msg.type !== 'commit') {
      throw ckptError('ERR_CKPT_SEQUENCE', `${msg.type} is not a checkpoint message`);
    }
    const tx = this.tx;
    if (tx === null) throw ckptError('ERR_CKPT_SEQUENCE', `${msg.type.toUpperCase()} outside a transaction`);
    if (msg.epoch !== tx.epoch) {
      throw ckptError('ERR_CKPT_EPOCH', `${msg.type.toUpperCase()} for epoch ${msg.epoch} in transaction ${tx.epoch}`, {
        epoch: msg.epoch,
        open: tx.epoch,
      });
    }

    switch (msg.type) {
      case 'pages':
        this.pages(tx, msg);
        return null;
      case 'disk':
        if (this.state !== 'pages' && this.state !== 'disk') {
          throw ckptError('ERR_CKPT_SEQUENCE', `DISK after ${this.state.toUpperCase()}`);
        }
        this.grow(tx, msg);
        tx.disk.push({ offset: msg.offset, data: msg.data });
        tx.diskBytes += msg.data.length;
        this.state = 'disk';
        return null;
      case 'diskzero':
        if (this.state !== 'pages' && this.state !== 'disk') {
          throw ckptError('ERR_CKPT_SEQUENCE', `DISKZERO after ${this.state.toUpperCase()}`);
        }
        // 24 bytes of payload against the budget; COMMIT.diskBytes counts DISK data only,
        // the digest covers the range.
        this.grow(tx, msg);
        tx.disk.push({ offset: msg.offset, length: msg.length, zero: true });
        this.state = 'disk';
        return null;
      case 'devstate':
        if (this.state === 'devstate') throw ckptError('ERR_CKPT_SEQUENCE', 'second DEVSTATE');
        this.grow(tx, msg);
        tx.devstate = msg.data;
        this.state = 'devstate';
        return null;
      case 'commit':
        return this.commit(tx, msg);
    }
  }

  /** BEGIN: opens the transaction of the expected epoch. */
  private begin(epoch: number): null {
    if (this.tx !== null) {
      throw ckptError('ERR_CKPT_SEQUENCE', `BEGIN ${epoch} inside open transaction ${this.tx.epoch}`);
    }
    if (epoch !== this.expect) {
      throw ckptError('ERR_CKPT_EPOCH', `BEGIN ${epoch}, expected epoch ${this.expect}`, { epoch, expect: this.expect });
    }
    this.tx = {
      epoch,
      digest: new CheckpointDigest(),
      bytes: 0,
      pages: 0,
      pfnChunks: [],
      zeroChunks: [],
      dataChunks: [],
      disk: [],
      diskBytes: 0,
      devstate: null,
    };
    this.state = 'pages';
    return null;
  }

  /** PAGES: every pfn inside guest RAM and new to the transaction. */
  private pages(tx: Transaction, msg: CheckpointMessage & { type: 'pages' }): void {
    if (this.state !== 'pages') throw ckptError('ERR_CKPT_SEQUENCE', `PAGES after ${this.state.toUpperCase()}`);
    this.grow(tx, msg); // also checks the zero mask and the data length
    for (let i = 0; i < msg.pfns.length; i++) {
      const pfn = msg.pfns[i]!;
      if (pfn >= this.ramPages) {
        // Record what was marked so far so reset() can clear it.
        tx.pfnChunks.push(msg.pfns.subarray(0, i));
        throw ckptError('ERR_CKPT_PFN_RANGE', `pfn ${pfn} outside guest RAM`, { pfn, ramPages: this.ramPages });
      }
      const bit = 1 << (pfn & 7);
      if ((this.seen[pfn >>> 3]! & bit) !== 0) {
        tx.pfnChunks.push(msg.pfns.subarray(0, i));
        throw ckptError('ERR_CKPT_DUPLICATE_PAGE', `pfn ${pfn} twice in checkpoint ${tx.epoch}`, { pfn });
      }
      this.seen[pfn >>> 3]! |= bit;
    }
    tx.pfnChunks.push(msg.pfns);
    tx.zeroChunks.push(msg.zero);
    if (msg.data.length > 0) tx.dataChunks.push(msg.data);
    tx.pages += msg.pfns.length;
  }

  /** COMMIT: the totals and the digest must match what arrived; then the checkpoint is whole. */
  private commit(tx: Transaction, msg: CheckpointMessage & { type: 'commit' }): Checkpoint {
    if (tx.devstate === null) throw ckptError('ERR_CKPT_INCOMPLETE', `COMMIT ${tx.epoch} without DEVSTATE`);
    if (msg.pages !== tx.pages || msg.diskBytes !== tx.diskBytes || msg.devstateBytes !== tx.devstate.length) {
      throw ckptError('ERR_CKPT_TOTALS', `COMMIT ${tx.epoch} totals do not match what was received`, {
        commit: { pages: msg.pages, diskBytes: msg.diskBytes, devstateBytes: msg.devstateBytes },
        received: { pages: tx.pages, diskBytes: tx.diskBytes, devstateBytes: tx.devstate.length },
      });
    }
    const digest = tx.digest.digest();
    if (msg.digest.length !== DIGEST_SIZE || !digest.equals(msg.digest)) {
      throw ckptError('ERR_CKPT_DIGEST', `COMMIT ${tx.epoch} digest mismatch`);
    }
    const ckpt: Checkpoint = {
      epoch: tx.epoch,
      pfns: concatTyped(Uint32Array, tx.pfnChunks, tx.pages),
      zeroMask: concatTyped(Uint8Array, tx.zeroChunks, tx.pages),
      data: tx.dataChunks.length === 1 ? tx.dataChunks[0]! : Buffer.concat(tx.dataChunks),
      disk: tx.disk,
      devstate: tx.devstate,
    };
    this.reset();
    this.expect = tx.epoch + 1;
    return ckpt;
  }

  /** Adds a message to the digest and the size budget (ERR_CKPT_TOO_LARGE). */
  private grow(tx: Transaction, msg: CheckpointMessage & { type: 'pages' | 'disk' | 'diskzero' | 'devstate' }): void {
    tx.bytes += tx.digest.update(msg);
    if (tx.bytes > this.maxCheckpointBytes) {
      throw ckptError('ERR_CKPT_TOO_LARGE', `checkpoint ${tx.epoch} exceeds ${this.maxCheckpointBytes} bytes`, {
        bytes: tx.bytes,
      });
    }
  }
}

function concatTyped<T extends Uint32Array | Uint8Array>(Ctor: new (n: number) => T, chunks: readonly T[], total: number): T {
  const out = new Ctor(total);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

/**
 * Splits a checkpoint into its message transaction (the D side, and tests):
 * BEGIN · PAGES (≤ maxPagesPerMessage entries each) · (DISK | DISKZERO)* · DEVSTATE · COMMIT.
 * A zero extent longer than MAX_DISK_ZERO_BYTES becomes several DISKZERO messages.
 */
export function checkpointMessages(ckpt: Checkpoint, opts: { maxPagesPerMessage?: number } = {}): CheckpointMessage[] {
  const per = opts.maxPagesPerMessage ?? 1024;
  const out: CheckpointMessage[] = [{ type: 'begin', epoch: ckpt.epoch }];
  const digest = new CheckpointDigest();
  let dataOff = 0;
  for (let i = 0; i < ckpt.pfns.length; i += per) {
    const pfns = ckpt.pfns.subarray(i, i + per);
    const zero = ckpt.zeroMask.subarray(i, i + per);
    let nonZero = 0;
    for (const z of zero) if (z === 0) nonZero++;
    const data = ckpt.data.subarray(dataOff, dataOff + nonZero * PAGE_SIZE);
    dataOff += data.length;
    const m: CheckpointMessage = { type: 'pages', epoch: ckpt.epoch, pfns, zero, data };
    digest.update(m);
    out.push(m);
  }
  let diskBytes = 0;
  for (const d of ckpt.disk) {
    if (d.zero) {
      for (let at = 0; at < d.length; at += MAX_DISK_ZERO_BYTES) {
        const m: CheckpointMessage = {
          type: 'diskzero',
          epoch: ckpt.epoch,
          offset: d.offset + at,
          length: Math.min(MAX_DISK_ZERO_BYTES, d.length - at),
        };
        digest.update(m);
        out.push(m);
      }
      continue;
    }
    const m: CheckpointMessage = { type: 'disk', epoch: ckpt.epoch, offset: d.offset, data: d.data };
    digest.update(m);
    out.push(m);
    diskBytes += d.data.length;
  }
  const dev: CheckpointMessage = { type: 'devstate', epoch: ckpt.epoch, data: ckpt.devstate };
  digest.update(dev);
  out.push(dev);
  out.push({
    type: 'commit',
    epoch: ckpt.epoch,
    pages: ckpt.pfns.length,
    diskBytes,
    devstateBytes: ckpt.devstate.length,
    digest: digest.digest(),
  });
  return out;
}
