/**
 * The block-write journal: the disk's half of output commit.
 *
 * A BlockDevice over the VM's image (what the NBD server serves) and an
 * EpochOutputs (what the destination's epoch barrier drives). Modes:
 *
 *   pass-through  writes go to the image; FLUSH and FUA are the image's fdatasync.
 *                 The destination after the write-back, until its QEMU switches to
 *                 its own file node (outside the window QEMU reads the image itself).
 *   journal       destination during post-copy, from before its QEMU can run:
 *                 writes of epoch k are kept in memory under k and never touch
 *                 the shared image; reads see the unreleased epochs over the
 *                 image. With a write-ahead log (journal-log.ts) every write,
 *                 TRIM and WRITE_ZEROES is appended to it before it completes,
 *                 and FLUSH/FUA complete after the log's fdatasync: a restarted
 *                 sidecar rebuilds the epochs from it (recover(), journal-epochs.ts). seal(k) hands epoch k's extents to
 *                 checkpoint k; the source writes them to the image before ACK(k);
 *                 release(k) then drops epochs <= k (the image holds them now).
 *   draining      passThrough() after the final ACK: the journal still held is
 *                 written to the image and fdatasync'ed; writes wait, reads are
 *                 served as in journal mode; then pass-through.
 *   discarded     the destination fenced: every held write is dropped, every
 *                 waiting and later request fails; nothing reaches the image.
 *
 * Memory is bounded by `maxBytes` (bytes of unreleased journaled data): a write
 * that does not fit waits — its reply to the guest is delayed — until a release
 * frees space. quiesce() (the barrier is about to `stop` the VM, and QEMU's stop
 * waits for every in-flight request) admits the waiting writes; the bound then
 * overshoots by at most the requests QEMU has in flight, and holds again from
 * the next seal.
 */
import { MAX_DISK_ZERO_BYTES } from '../checkpoint/messages.ts';
import { TetherError } from '../errors.ts';
import type { DiskExtent, EpochOutputs } from '../epoch/outputs.ts';
import { ignored, type Logger } from '../util/log.ts';
import type { BlockDevice } from './block-device.ts';
import { ExtentMap } from './extent-map.ts';
import { copy, coveredRead, epochsFromReplay, writeEpochsBack, type Epoch } from './journal-epochs.ts';
import type { JournalLog, Replay } from './journal-log.ts';

/**
 * Largest DISK extent seal() hands out. A DISK frame carries 16 bytes of header
 * (epoch, offset) plus data and must fit the peer channel's 8 MiB frame limit;
 * 4 MiB matches the largest PAGES message.
 */
export const MAX_DISK_EXTENT_BYTES = 4 * 1024 * 1024;

export type JournalMode = 'pass-through' | 'journal' | 'draining' | 'discarded';

export interface JournalOptions {
  /** Bound of journaled, unreleased bytes before writes are delayed. */
  maxBytes: number;
  /** Largest extent in seal()'s result (default MAX_DISK_EXTENT_BYTES). */
  maxExtentBytes?: number;
  /**
   * For a control test, set by the caller (never in production): journal() leaves the
   * device writing through, so the destination writes the shared image in the window.
   */
  writeThrough?: boolean;
  /**
   * The write-ahead log: every journaled request is appended before it completes,
   * FLUSH/FUA wait for its fdatasync. It is removed once the journal was written
   * back (passThrough) or dropped (discard). Without it the journal is memory only.
   */
  wal?: JournalLog;
  log?: Logger;
  /**
   * A hook for tests, set by the caller: awaited by the write-back right after its first
   * extent is in the image (a test kills the sidecar while it waits).
   */
  writeBackHold?: () => Promise<void>;
}

export class BlockJournal implements BlockDevice, EpochOutputs {
  readonly size: number;
  readonly canTrim = true;
  readonly #image: BlockDevice;
  readonly #maxBytes: number;
  readonly #maxExtent: number;
  readonly #writeThrough: boolean;
  readonly #log: Logger | undefined;
  readonly #wal: JournalLog | undefined;
  readonly #writeBackHold: (() => Promise<void>) | undefined;
  #mode: JournalMode = 'pass-through';
  /** Unreleased epochs, oldest first; in journal mode the last one is open. */
  #epochs: Epoch[] = [];
  #held = 0;
  #quiescing = false;
  #waiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  #drain: Promise<void> | null = null;
  /** discard()'s removal of the log. */
  #removing: Promise<void> | undefined;
  /** Figures for status and benchmarks (zeroBytes: the TRIM / WRITE_ZEROES share of journaledBytes). */
  readonly stats = { journaledBytes: 0, zeroBytes: 0, sealedBytes: 0, delayedWrites: 0, peakHeldBytes: 0 };

  constructor(image: BlockDevice, opts: JournalOptions) {
    if (!Number.isSafeInteger(opts.maxBytes) || opts.maxBytes <= 0) {
      throw new TetherError('ERR_JOURNAL_INVALID_OPTION', 'journal maxBytes must be a positive integer');
    }
    const maxExtent = opts.maxExtentBytes ?? MAX_DISK_EXTENT_BYTES;
    if (!Number.isSafeInteger(maxExtent) || maxExtent <= 0 || maxExtent > MAX_DISK_EXTENT_BYTES) {
      throw new TetherError('ERR_JOURNAL_INVALID_OPTION', `maxExtentBytes must be in [1, ${MAX_DISK_EXTENT_BYTES}]`);
    }
    this.#image = image;
    this.size = image.size;
    this.#maxBytes = opts.maxBytes;
    this.#maxExtent = maxExtent;
    this.#writeThrough = opts.writeThrough ?? false;
    this.#log = opts.log;
    this.#wal = opts.wal;
    this.#writeBackHold = opts.writeBackHold;
  }

  /**
   * A restarted sidecar: the journal as the log left it, in journal mode. The replay's
   * records (epochs after the last acknowledged one) are put back in log order, each
   * epoch sealed but the last, which stays open (the guest's writes go on there). The
   * bound is not applied to what is replayed: it was admitted before.
   */
  static recover(image: BlockDevice, replay: Replay, opts: JournalOptions & { nextEpoch: number }): BlockJournal {
    const j = new BlockJournal(image, { ...opts, writeThrough: false });
    image.bypassCache?.(opts.log);
    const { epochs, held } = epochsFromReplay(replay, opts.nextEpoch);
    j.#mode = 'journal';
    j.#epochs = epochs;
    j.#held = held;
    return j;
  }

  /** The epoch writes go to now (journal mode), or null. */
  get openEpoch(): number | null {
    return this.#mode === 'journal' ? this.#epochs[this.#epochs.length - 1]!.epoch : null;
  }

  /** The journal's content for tests and recovery checks: every unreleased epoch, oldest first. */
  epochs(): { epoch: number; sealed: boolean; map: ExtentMap }[] {
    return this.#epochs.map((e) => ({ ...e }));
  }

  get mode(): JournalMode {
    return this.#mode;
  }

  /** Journaled bytes not yet released. */
  get heldBytes(): number {
    return this.#held;
  }

  /**
   * Enter journal mode with `firstEpoch` open (the destination, before its QEMU
   * can run). With the writeThrough option the device stays in pass-through.
   */
  journal(firstEpoch = 1): void {
    if (this.#mode !== 'pass-through' || this.#epochs.length > 0) {
      throw new TetherError('ERR_JOURNAL_STATE', `cannot start journaling in mode ${this.#mode}`);
    }
    if (this.#writeThrough) {
      this.#log?.warn('journal writes through (writeThrough option): destination disk writes go straight to the image');
      return;
    }
    // The source writes the shared image while the window is open: a page this host
    // cached earlier may be stale (NFS, SAN), so the image is read around the cache.
    this.#image.bypassCache?.(this.#log);
    this.#mode = 'journal';
    this.#epochs = [{ epoch: firstEpoch, map: new ExtentMap(), sealed: false }];
  }

  // ---- BlockDevice ----

  async read(offset: number, length: number): Promise<Buffer> {
    this.#check(offset, length);
    // The layers are taken before the image read: an epoch released while the
    // read is in flight is still overlaid, so a read that raced the source's
    // write of that epoch to the image cannot come back stale.
    const layers = this.#epochs.map((e) => e.map);
    // Every byte held by the journal: no image read (with O_DIRECT that is a device read).
    const covered = coveredRead(layers, offset, length);
    if (covered) return covered;
    const buf = await this.#image.read(offset, length);
    for (const m of layers) m.overlay(offset, buf);
    return buf;
  }

  async write(offset: number, data: Buffer, opts?: { fua?: boolean }): Promise<void> {
    this.#check(offset, data.length);
    await this.#journalOr(
      offset,
      data.length,
      () => copy(data),
      () => this.#image.write(offset, data, opts),
      opts?.fua ?? false,
    );
  }

  /** Fast path (see BlockDevice.readNow): the overlay is memory, the image read must not block. */
  readNow(offset: number, length: number): Buffer | undefined {
    if (this.#mode !== 'journal' && this.#mode !== 'pass-through') return undefined;
    if (this.#mode === 'journal' && length > 0) {
      this.#check(offset, length);
      const layers = this.#epochs.map((e) => e.map);
      const covered = coveredRead(layers, offset, length);
      if (covered) return covered;
    }
    const buf = this.#image.readNow?.(offset, length);
    if (buf) for (const e of this.#epochs) e.map.overlay(offset, buf);
    return buf;
  }

  /**
   * Fast path (see BlockDevice.writeNow). In journal mode a write that fits the bound,
   * with no earlier write waiting for room, is journaled now; pass-through asks the image.
   */
  writeNow(offset: number, data: Buffer): boolean {
    if (data.length === 0) return false;
    if (this.#mode === 'journal') {
      if (this.#waiters.length > 0 || (!this.#quiescing && this.#held > 0 && this.#held + data.length > this.#maxBytes)) return false;
      this.#check(offset, data.length);
      const d = copy(data);
      // With a log the write completes only once its record is written: here when the
      // log can append it on this thread, else write() does it.
      if (this.#wal && !this.#wal.writeNow(this.openEpoch!, offset, d)) return false;
      this.#put(offset, data.length, d);
      return true;
    }
    if (this.#mode === 'pass-through' && !this.#drain) return this.#image.writeNow?.(offset, data) ?? false;
    return false;
  }

  async flush(): Promise<void> {
    this.#usable();
    if (this.#drain) await this.#drain;
    if (this.#mode === 'journal') {
      // Every completed write's record was written; FLUSH makes them durable.
      await this.#wal?.sync();
      return;
    }
    await this.#image.flush();
  }

  async trim(offset: number, length: number): Promise<void> {
    this.#check(offset, length);
    // Journaled as a zero extent (no buffer): reads after a trim may return anything,
    // zeroes included, and the source then applies exactly what the guest was shown.
    await this.#journalOr(
      offset,
      length,
      () => null,
      () => this.#image.trim(offset, length),
      false,
    );
  }

  async writeZeroes(offset: number, length: number, opts?: { fua?: boolean }): Promise<void> {
    this.#check(offset, length);
    await this.#journalOr(
      offset,
      length,
      () => null,
      () => this.#image.writeZeroes(offset, length, opts),
      opts?.fua ?? false,
    );
  }

  async close(): Promise<void> {
    // a failed write-back was logged and failed the requests that waited for it
    if (this.#drain) await this.#drain.catch(ignored(this.#log, 'the write-back failed: reported by passThrough()'));
    await this.#image.close();
  }

  async #journalOr(offset: number, length: number, data: () => Buffer | null, through: () => Promise<void>, fua: boolean): Promise<void> {
    if (length === 0) return;
    if (this.#mode === 'journal') {
      await this.#admit(length);
      if (this.#mode === 'journal') {
        const d = data();
        const wal = this.#wal;
        if (d && wal?.writeNow(this.openEpoch!, offset, d)) {
          this.#put(offset, length, d);
          if (fua) await wal.sync();
          return;
        }
        const epoch = this.#put(offset, length, d);
        if (wal) {
          // In the map at once (a read may see a write not yet acknowledged, as NBD
          // allows); acknowledged only once the record is written (and synced for FUA).
          await (d ? wal.write(epoch, offset, d) : wal.zeroes(epoch, offset, length));
          if (fua) await wal.sync();
        }
        return;
      }
    }
    this.#usable();
    if (this.#drain) await this.#drain;
    this.#usable();
    await through();
  }

  /** Into the open epoch (returned); `null` data: the range reads as zeroes. */
  #put(offset: number, length: number, data: Buffer | null): number {
    const open = this.#epochs[this.#epochs.length - 1]!;
    const before = open.map.bytes;
    if (data) open.map.put(offset, data);
    else open.map.putZeroes(offset, length);
    this.#held += open.map.bytes - before;
    this.stats.journaledBytes += length;
    if (!data) this.stats.zeroBytes += length;
    if (this.#held > this.stats.peakHeldBytes) this.stats.peakHeldBytes = this.#held;
    return open.epoch;
  }

  /** Waits until `length` more bytes fit (or nothing is held, or the barrier quiesces). */
  async #admit(length: number): Promise<void> {
    let waited = false;
    while (this.#mode === 'journal' && !this.#quiescing && this.#held > 0 && this.#held + length > this.#maxBytes) {
      if (!waited) this.stats.delayedWrites++;
      waited = true;
      await new Promise<void>((resolve, reject) => this.#waiters.push({ resolve, reject }));
    }
    this.#usable();
  }

  #wake(): void {
    const w = this.#waiters;
    this.#waiters = [];
    for (const x of w) x.resolve();
  }

  #check(offset: number, length: number): void {
    this.#usable();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new TetherError('ERR_DISK_RANGE', `request [${offset}, +${length}) outside the ${this.size}-byte disk`);
    }
  }

  #usable(): void {
    if (this.#mode === 'discarded') {
      throw new TetherError('ERR_JOURNAL_DISCARDED', 'the journal was discarded (destination fenced): request refused');
    }
  }

  // ---- EpochOutputs ----

  /** The barrier is about to stop the VM: QEMU's stop waits for in-flight writes, so admit them. */
  quiesce(): void {
    this.#quiescing = true;
    this.#wake();
  }

  /**
   * The `stop` that quiesce() prepared for is not coming (the epoch loop ended without a
   * barrier: the final checkpoint was taken already): the bound holds again at once.
   */
  unquiesce(): void {
    this.#quiescing = false;
  }

  async seal(epoch: number): Promise<DiskExtent[]> {
    this.#quiescing = false;
    if (this.#mode !== 'journal') return [];
    const open = this.#epochs[this.#epochs.length - 1]!;
    if (open.epoch !== epoch) {
      throw new TetherError('ERR_JOURNAL_STATE', `seal(${epoch}) but epoch ${open.epoch} is open`);
    }
    open.sealed = true;
    this.#epochs.push({ epoch: epoch + 1, map: new ExtentMap(), sealed: false });
    // every record of `epoch` is appended or queued: a full log segment ends here
    this.#wal?.sealed(epoch);
    // The boundary is set (writes from now on are epoch + 1's) and epoch's map no longer
    // changes: its extents are built on the next turn of the event loop, after the barrier
    // has sent `cont`, not inside the guest's pause (a copy of what the epoch wrote).
    await new Promise((resolve) => setImmediate(resolve));
    // Zero extents travel as DISKZERO (no payload), up to MAX_DISK_ZERO_BYTES each.
    const out = open.map.coalesced(this.#maxExtent, MAX_DISK_ZERO_BYTES);
    this.stats.sealedBytes += open.map.bytes;
    return out;
  }

  release(epoch: number): void {
    if (this.#mode !== 'journal' && this.#mode !== 'draining') return;
    while (this.#epochs.length > 0 && this.#epochs[0]!.sealed && this.#epochs[0]!.epoch <= epoch) {
      this.#held -= this.#epochs.shift()!.map.bytes;
    }
    // log segments holding only acknowledged epochs go (never rejects: a failed deletion is kept in wal.pruneError)
    void this.#wal?.released(epoch);
    this.#wake();
  }

  /**
   * After the final ACK: write what is still journaled to the image, then write
   * through. Writes wait for that; a failure fails them (and is logged).
   */
  passThrough(): void {
    if (this.#mode !== 'journal') return;
    this.#mode = 'draining';
    this.#wake();
    const drain = (async () => {
      await this.#writeBack();
      await this.#wal?.remove();
    })().then(
      () => {
        this.#epochs = [];
        this.#held = 0;
        if (this.#mode === 'draining') this.#mode = 'pass-through';
        this.#drain = null;
      },
      (e: unknown) => {
        this.#log?.error('writing the journal to the image failed', { error: e as Error });
        throw new TetherError('ERR_JOURNAL_WRITEBACK', `writing the journal to the image failed: ${(e as Error).message}`);
      },
    );
    // (awaited by the requests waiting on it, by drained() and close(); logged above)
    drain.catch(ignored(this.#log, 'the write-back failed: logged at error above'));
    this.#drain = drain;
  }

  /**
   * The source recorded completion with `finalEpoch`: recorded durably in the log before
   * passThrough() touches the image, so a sidecar restarted during the write-back knows
   * the outcome from the log alone and finishes it (docs/journal.md).
   */
  async markCompleted(finalEpoch: number): Promise<void> {
    await this.#wal?.completed(finalEpoch);
  }

  /** Resolves once passThrough()'s write-back (or discard()'s removal of the log) is done; rejects if the write-back failed. */
  async drained(): Promise<void> {
    if (this.#drain) await this.#drain;
    await this.#removing;
  }

  /**
   * The journal's figures for `tether status` and the write-back's log line; `log`: its
   * write-ahead log's (segments opened and deleted so far, records, bytes, fdatasyncs), or
   * null without one.
   */
  figures(): { mode: JournalMode; heldBytes: number; maxBytes: number; log: JournalLog['stats'] | null } & BlockJournal['stats'] {
    const log = this.#wal ? { ...this.#wal.stats } : null;
    return { mode: this.#mode, heldBytes: this.#held, maxBytes: this.#maxBytes, ...this.stats, log };
  }

  /** Extents held in every unreleased epoch (what a write-back writes, one image write each). */
  get extentCount(): number {
    return this.#epochs.reduce((n, e) => n + e.map.extents().length, 0);
  }

  async #writeBack(): Promise<void> {
    const bytes = await writeEpochsBack(this.#image, this.#epochs, this.#writeBackHold);
    this.#log?.info('journal written through to the image', { bytes, epochs: this.#epochs.length, ...this.figures() });
  }

  discard(): void {
    this.#mode = 'discarded';
    this.#epochs = [];
    this.#held = 0;
    // Nothing of it may ever reach the image: the log goes too.
    this.#removing = this.#wal?.remove().catch((e: unknown) => this.#log?.error('removing the journal log failed', { error: e as Error }));
    const w = this.#waiters;
    this.#waiters = [];
    const err = new TetherError('ERR_JOURNAL_DISCARDED', 'the journal was discarded (destination fenced)');
    for (const x of w) x.reject(err);
  }
}
