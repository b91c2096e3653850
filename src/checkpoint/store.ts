/**
 * Durable checkpoint state on S — the only file in checkpoint/ that touches the file system.
 *
 * Files in `dir`:
 *   applied.json          the applied record: {format, version, epoch, devstate, devstateBytes,
 *                         devstateCrc32, crc32}; crc32 = CRC-32 of the JSON of the record
 *                         without the crc32 field (keys in this order)
 *   devstate-<k>.bin      device state of applied checkpoint k (QEMU `-incoming exec:cat` input)
 *   stage.bin             checkpoint being applied (stage.ts); exists only during apply
 *   completed.json        the completion record: {format, version, epoch, crc32} (crc32 as in
 *                         applied.json). Once it exists the migration is over: the VM belongs to
 *                         the destination, nothing is applied and the source never resumes.
 *   reserve.bin           RESERVE_BYTES of zeros written by init0: room on the RAM file's tmpfs kept
 *                         for the small records. A record write that meets ENOSPC removes it and
 *                         retries once, so a tmpfs that runs full (another VM's RAM growing)
 *                         cannot stop applied.json or completed.json from being written.
 *   *.tmp                 files being written; never trusted, removed by recover()
 * Every file is replaced by tmp + fsync + rename + fsync(dir), so at every instant
 * applied.json names a complete device-state file of the epoch it records.
 *
 * apply(k): stage.bin → devstate-k.bin → RAM file pages (fdatasync) → disk extents (flush)
 * → applied.json(k) → remove stage.bin and devstate-(k-1).bin. A crash after the stage is
 * persisted is repaired by recover(), which re-applies the stage (every step is idempotent).
 * Everything that needs new room on the tmpfs (stage, device state) is written before the
 * first page: a full tmpfs fails the apply while the previous checkpoint is still whole. The
 * page writes need none (the source fallocates its RAM file before it migrates), and the
 * applied record has the reserve.
 */
import { constants as fsc } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { TetherError, isTetherError } from '../errors.ts';
import type { DiskExtent } from '../epoch/outputs.ts';
import type { Checkpoint } from './assembler.ts';
import { MAX_DISK_ZERO_BYTES, PAGE_SIZE } from './messages.ts';
import { decodeStage, encodeStage } from './stage.ts';

/** Where DISK extents go (the shared disk image); wired in by the block-write journal issue. */
export interface DiskSink {
  /** Refuses extents the sink could never write (past the image's end) before anything is written. */
  check(extents: readonly DiskExtent[]): Promise<void>;
  pwrite(offset: number, data: Buffer): Promise<void>;
  /** A zero extent (DISKZERO): afterwards the range reads as zeroes. */
  zero(offset: number, length: number): Promise<void>;
  /** Makes every write so far durable. */
  flush(): Promise<void>;
}

export interface StoreOptions {
  /** Per-VM state directory (created if missing). */
  dir: string;
  /** Guest RAM file (memory-backend-file mem-path). */
  ramPath: string;
  ramBytes: number;
  disk?: DiskSink;
  /**
   * Fault injection only (TETHER_FAULTS fail-apply-epoch / fail-apply-sticky): writing the
   * pages of checkpoint `epoch` fails with EIO once half of them are in the RAM file, once or
   * (sticky) on every attempt, as a RAM tmpfs that runs full would.
   */
  failPages?: { epoch: number; sticky: boolean };
}

export interface AppliedCheckpoint {
  epoch: number;
  /** Absolute path of the device-state file of that epoch. */
  devstatePath: string;
}

export interface RecoverReport extends AppliedCheckpoint {
  /** What recover() found in stage.bin. */
  stage:
    | { action: 'none' }
    | { action: 'reapplied'; epoch: number }
    | { action: 'discarded'; reason: 'corrupt' | 'stale' | 'epoch-gap' | 'invalid'; code?: string; epoch?: number };
}

const STAGE = 'stage.bin';
const APPLIED = 'applied.json';
const COMPLETED = 'completed.json';
const RESERVE = 'reserve.bin';
/** Room kept for the records (a few 4 KiB tmpfs pages each, tmp and final at once). */
export const RESERVE_BYTES = 64 * 1024;
const DEVSTATE_RE = /^devstate-(\d+)\.bin$/;
const IOV_MAX = 1024;
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

interface AppliedRecord {
  epoch: number;
  devstate: string;
}

function ioError(what: string, e: unknown): TetherError {
  if (e instanceof TetherError) return e;
  const err = e as NodeJS.ErrnoException;
  return new TetherError('ERR_CKPT_IO', `${what}: ${err.message ?? String(e)}`, { errno: err.code });
}

/** Writes every byte of `bufs` at `position`, in batches of at most IOV_MAX, retrying short writes. */
async function writeAll(fh: FileHandle, bufs: Buffer[], position: number): Promise<void> {
  let pending = bufs.filter((b) => b.length > 0);
  let pos = position;
  while (pending.length > 0) {
    const batch = pending.slice(0, IOV_MAX);
    let want = 0;
    for (const b of batch) want += b.length;
    const { bytesWritten } = await fh.writev(batch, pos);
    pos += bytesWritten;
    if (bytesWritten === want) {
      pending = pending.slice(batch.length);
      continue;
    }
    if (bytesWritten <= 0) throw new TetherError('ERR_CKPT_IO', 'write made no progress');
    // Short write: drop what was written and go on with the rest.
    let skip = bytesWritten;
    while (skip > 0) {
      const head = pending[0]!;
      if (head.length <= skip) {
        skip -= head.length;
        pending.shift();
      } else {
        pending[0] = head.subarray(skip);
        skip = 0;
      }
    }
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** tmp + fsync + rename + fsync(dir). */
async function writeAtomic(file: string, bufs: Buffer[]): Promise<void> {
  const tmp = `${file}.tmp`;
  const fh = await open(tmp, 'w', 0o600);
  try {
    await writeAll(fh, bufs, 0);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, file);
  await fsyncDir(path.dirname(file));
}

/**
 * writeAtomic for the small records: on ENOSPC the reserve file in the same directory is
 * removed (its room freed) and the write retried once.
 */
async function writeRecord(file: string, bufs: Buffer[]): Promise<void> {
  try {
    await writeAtomic(file, bufs);
  } catch (e) {
    if ((e as NodeJS.ErrnoException)?.code !== 'ENOSPC') throw e;
    const dir = path.dirname(file);
    await rm(`${file}.tmp`, { force: true });
    await rm(path.join(dir, RESERVE), { force: true });
    await writeAtomic(file, bufs);
  }
}

/** (Re)creates the reserve file when it is missing; best effort (a full tmpfs just has none). */
async function ensureReserve(dir: string): Promise<void> {
  const file = path.join(dir, RESERVE);
  try {
    if ((await stat(file)).size === RESERVE_BYTES) return;
  } catch {
    /* missing */
  }
  await writeAtomic(file, [Buffer.alloc(RESERVE_BYTES)]).catch(() => rm(`${file}.tmp`, { force: true }).catch(() => undefined));
}

function recordBody(r: AppliedRecord, devstateBytes: number, devstateCrc32: number): string {
  return JSON.stringify({
    format: 'tether-applied',
    version: 1,
    epoch: r.epoch,
    devstate: r.devstate,
    devstateBytes,
    devstateCrc32,
  });
}

function encodeRecord(r: AppliedRecord, devstate: Buffer): Buffer {
  const body = recordBody(r, devstate.length, crc32(devstate));
  const withCrc = `${body.slice(0, -1)},"crc32":${crc32(Buffer.from(body, 'utf8'))}}\n`;
  return Buffer.from(withCrc, 'utf8');
}

function corruptRecord(message: string): TetherError {
  return new TetherError('ERR_CKPT_APPLIED_CORRUPT', `applied record: ${message}`);
}

function decodeRecord(text: string): AppliedRecord & { devstateBytes: number; devstateCrc32: number } {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw corruptRecord('not JSON');
  }
  if (typeof v !== 'object' || v === null) throw corruptRecord('not an object');
  const o = v as Record<string, unknown>;
  const { epoch, devstate, devstateBytes, devstateCrc32, crc32: crc } = o;
  if (o.format !== 'tether-applied' || o.version !== 1) throw corruptRecord('unknown format or version');
  if (
    !Number.isSafeInteger(epoch) ||
    (epoch as number) < 0 ||
    typeof devstate !== 'string' ||
    !DEVSTATE_RE.test(devstate) ||
    !Number.isSafeInteger(devstateBytes) ||
    !Number.isSafeInteger(devstateCrc32) ||
    typeof crc !== 'number'
  ) {
    throw corruptRecord('bad fields');
  }
  const r = { epoch: epoch as number, devstate };
  const body = recordBody(r, devstateBytes as number, devstateCrc32 as number);
  if (crc32(Buffer.from(body, 'utf8')) !== crc) throw corruptRecord('checksum mismatch');
  return { ...r, devstateBytes: devstateBytes as number, devstateCrc32: devstateCrc32 as number };
}

type HandshakeFormat = 'tether-completed' | 'tether-completing';

function completedBody(epoch: number, format: HandshakeFormat = 'tether-completed'): string {
  return JSON.stringify({ format, version: 1, epoch });
}

function encodeCompleted(epoch: number, format: HandshakeFormat = 'tether-completed'): Buffer {
  const body = completedBody(epoch, format);
  return Buffer.from(`${body.slice(0, -1)},"crc32":${crc32(Buffer.from(body, 'utf8'))}}\n`, 'utf8');
}

function decodeCompleted(text: string, format: HandshakeFormat = 'tether-completed'): number {
  const bad = (m: string) => new TetherError('ERR_CKPT_COMPLETED_CORRUPT', `completion record: ${m}`);
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw bad('not JSON');
  }
  if (typeof v !== 'object' || v === null) throw bad('not an object');
  const o = v as Record<string, unknown>;
  if (o.format !== format || o.version !== 1) throw bad('unknown format or version');
  if (!Number.isSafeInteger(o.epoch) || (o.epoch as number) < 0 || typeof o.crc32 !== 'number') throw bad('bad fields');
  if (crc32(Buffer.from(completedBody(o.epoch as number, format), 'utf8')) !== o.crc32) throw bad('checksum mismatch');
  return o.epoch as number;
}

/**
 * The destination's side of the handshake: `file` records, durably and checksummed like
 * completed.json (format 'tether-completing'), that it asked the source to complete at `epoch`.
 * A restarted destination sidecar that finds it waits for the source's answer instead of fencing.
 */
export async function writeCompletingRecord(file: string, epoch: number): Promise<void> {
  try {
    await writeAtomic(file, [encodeCompleted(epoch, 'tether-completing')]);
  } catch (e) {
    throw ioError('recording the completion request', e);
  }
}

/** Epoch of writeCompletingRecord's file, null if absent; ERR_CKPT_COMPLETED_CORRUPT if damaged. */
export async function readCompletingRecord(file: string): Promise<number | null> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if (isEnoent(e)) return null;
    throw ioError('reading the completion request record', e);
  }
  return decodeCompleted(text, 'tether-completing');
}

const devstateName = (epoch: number): string => `devstate-${epoch}.bin`;

function isEnoent(e: unknown): boolean {
  return (e as NodeJS.ErrnoException)?.code === 'ENOENT';
}

/**
 * Throws ERR_CKPT_INVALID / ERR_CKPT_PFN_RANGE / ERR_CKPT_DUPLICATE_PAGE unless the checkpoint
 * is internally consistent and fits a guest of `ramPages` pages.
 */
export function validateCheckpoint(ckpt: Checkpoint, ramPages: number): void {
  const { pfns, zeroMask } = ckpt;
  if (!Number.isSafeInteger(ckpt.epoch) || ckpt.epoch < 0) {
    throw new TetherError('ERR_CKPT_INVALID', 'checkpoint epoch is not a safe non-negative integer');
  }
  if (!(pfns instanceof Uint32Array) || !(zeroMask instanceof Uint8Array) || zeroMask.length !== pfns.length) {
    throw new TetherError('ERR_CKPT_INVALID', 'pfns and zeroMask differ in length');
  }
  const seen = new Uint8Array(Math.ceil(ramPages / 8));
  let nonZero = 0;
  for (let i = 0; i < pfns.length; i++) {
    const pfn = pfns[i]!;
    if (pfn >= ramPages) throw new TetherError('ERR_CKPT_PFN_RANGE', `pfn ${pfn} outside guest RAM`, { pfn, ramPages });
    const bit = 1 << (pfn & 7);
    if ((seen[pfn >>> 3]! & bit) !== 0) throw new TetherError('ERR_CKPT_DUPLICATE_PAGE', `pfn ${pfn} twice`, { pfn });
    seen[pfn >>> 3]! |= bit;
    const z = zeroMask[i]!;
    if (z > 1) throw new TetherError('ERR_CKPT_INVALID', 'zeroMask entries must be 0 or 1');
    if (z === 0) nonZero++;
  }
  if (ckpt.data.length !== nonZero * PAGE_SIZE) {
    throw new TetherError('ERR_CKPT_INVALID', 'page data does not match the non-zero pages');
  }
  for (const d of ckpt.disk) {
    const ok = d.zero ? Number.isSafeInteger(d.length) && d.length >= 1 && d.length <= MAX_DISK_ZERO_BYTES : Buffer.isBuffer(d.data);
    if (!Number.isSafeInteger(d.offset) || d.offset < 0 || !ok) {
      throw new TetherError('ERR_CKPT_INVALID', 'bad disk extent');
    }
  }
  if (!Buffer.isBuffer(ckpt.devstate)) throw new TetherError('ERR_CKPT_INVALID', 'devstate must be a Buffer');
}

export class CheckpointStore {
  private readonly dir: string;
  private readonly ramPath: string;
  private readonly ramBytes: number;
  private readonly ramPages: number;
  private readonly disk: DiskSink | undefined;
  private failPages: StoreOptions['failPages'];
  private applied: AppliedRecord | null = null;
  /** Set when an apply failed after its stage was persisted: only recover() may continue. */
  private broken = false;
  /** Final epoch of a completed migration (completed.json), or null. */
  private completed: number | null = null;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(opts: StoreOptions) {
    if (!Number.isSafeInteger(opts.ramBytes) || opts.ramBytes <= 0 || opts.ramBytes % PAGE_SIZE !== 0) {
      throw new TetherError('ERR_CKPT_INVALID_OPTION', 'ramBytes must be a positive multiple of 4096');
    }
    this.dir = path.resolve(opts.dir);
    this.ramPath = opts.ramPath;
    this.ramBytes = opts.ramBytes;
    this.ramPages = opts.ramBytes / PAGE_SIZE;
    this.disk = opts.disk;
    this.failPages = opts.failPages;
  }

  /** The last applied checkpoint (after init0 or recover). */
  lastApplied(): AppliedCheckpoint {
    if (this.applied === null) throw new TetherError('ERR_CKPT_NOT_INITIALIZED', 'no checkpoint recorded yet');
    // After a failed apply the RAM file may hold part of the next checkpoint: the applied
    // record's device state no longer matches it, so it is no state to resume from.
    if (this.broken) {
      throw new TetherError('ERR_CKPT_STORE_BROKEN', `checkpoint ${this.applied.epoch + 1} is half applied; repair() first`);
    }
    return { epoch: this.applied.epoch, devstatePath: path.join(this.dir, this.applied.devstate) };
  }

  /** Records checkpoint 0: S's own RAM file as it is plus this device state. Discards older state. */
  init0(devstate: Buffer): Promise<void> {
    return this.exclusive(async () => {
      try {
        await mkdir(this.dir, { recursive: true });
        await this.checkRamFile();
        // A stage of an earlier migration must never be re-applied on top of this one.
        await rm(path.join(this.dir, STAGE), { force: true });
        await rm(path.join(this.dir, COMPLETED), { force: true });
        await fsyncDir(this.dir);
        this.completed = null;
        const record: AppliedRecord = { epoch: 0, devstate: 'devstate-0.bin' };
        await writeAtomic(path.join(this.dir, record.devstate), [devstate]);
        await writeRecord(path.join(this.dir, APPLIED), [encodeRecord(record, devstate)]);
        await ensureReserve(this.dir);
        this.applied = record;
        this.broken = false;
        await this.removeUnreferenced();
      } catch (e) {
        throw ioError('init0', e);
      }
    });
  }

  /**
   * Durably applies checkpoint applied+1 (ERR_CKPT_EPOCH otherwise). Resolves only when the
   * RAM file, disk extents, device state and applied record are all on stable storage: only
   * then may the caller ACK. Applies are serialised.
   */
  apply(ckpt: Checkpoint): Promise<void> {
    return this.exclusive(async () => {
      const applied = this.applied;
      if (applied === null) throw new TetherError('ERR_CKPT_NOT_INITIALIZED', 'apply before init0/recover');
      if (this.broken) throw new TetherError('ERR_CKPT_STORE_BROKEN', 'an earlier apply failed; run recover()');
      if (this.completed !== null) {
        throw new TetherError('ERR_CKPT_COMPLETED', `the migration completed at checkpoint ${this.completed}; nothing more is applied`);
      }
      if (ckpt.epoch !== applied.epoch + 1) {
        throw new TetherError('ERR_CKPT_EPOCH', `checkpoint ${ckpt.epoch} cannot follow applied ${applied.epoch}`, {
          epoch: ckpt.epoch,
          applied: applied.epoch,
        });
      }
      validateCheckpoint(ckpt, this.ramPages);
      // A checkpoint whose disk extents cannot land is refused whole, before a page is written.
      if (this.disk !== undefined && ckpt.disk.length > 0) await this.disk.check(ckpt.disk);
      try {
        await this.checkRamFile();
        await writeAtomic(path.join(this.dir, STAGE), encodeStage(ckpt));
        // Before any page: a device-state file no record names yet (a full tmpfs fails here,
        // with the previous checkpoint whole).
        await writeAtomic(path.join(this.dir, devstateName(ckpt.epoch)), [ckpt.devstate]);
      } catch (e) {
        // Nothing but a tmp file, an unreferenced stage or device state may have changed.
        for (const f of [STAGE, `${STAGE}.tmp`, `${devstateName(ckpt.epoch)}.tmp`]) {
          await rm(path.join(this.dir, f), { force: true }).catch(() => undefined);
        }
        throw ioError('persisting stage', e);
      }
      try {
        await this.applyStaged(ckpt, true);
      } catch (e) {
        this.broken = true;
        throw ioError(`applying checkpoint ${ckpt.epoch}`, e);
      }
      await ensureReserve(this.dir);
    });
  }

  /**
   * Proof, from stable storage, that lastApplied() can be restored: the applied record on disk
   * decodes, names the epoch this store holds, and its device-state file is whole (length and
   * CRC-32 as recorded). Throws ERR_CKPT_STORE_BROKEN, ERR_CKPT_APPLIED_CORRUPT or
   * ERR_CKPT_DEVSTATE_CORRUPT otherwise.
   */
  verifyApplied(): Promise<AppliedCheckpoint> {
    return this.exclusive(async () => {
      const last = this.lastApplied();
      let text: string;
      try {
        text = await readFile(path.join(this.dir, APPLIED), 'utf8');
      } catch (e) {
        throw corruptRecord(`unreadable: ${(e as Error).message}`);
      }
      const record = decodeRecord(text);
      if (record.epoch !== last.epoch || record.devstate !== this.applied!.devstate) {
        throw corruptRecord(`names checkpoint ${record.epoch}, the store applied ${last.epoch}`);
      }
      await this.checkDevstate(record);
      return last;
    });
  }

  /**
   * The source gives up a rollback it cannot carry out (docs/design.md "Restore before fence"):
   * recorded durably as completion at the last applied epoch, the same commit point as a
   * completed migration — from now on this host never resumes the VM, not even after a restart
   * of its sidecar. Written even when the store is broken (a half-applied checkpoint is exactly
   * when it is needed), with the reserve's room if the tmpfs is full.
   */
  recordGaveUp(): Promise<number> {
    return this.exclusive(async () => {
      const applied = this.applied;
      if (applied === null) throw new TetherError('ERR_CKPT_NOT_INITIALIZED', 'give up before init0/recover');
      try {
        await writeRecord(path.join(this.dir, COMPLETED), [encodeCompleted(applied.epoch)]);
      } catch (e) {
        throw ioError('recording that the rollback was given up', e);
      }
      this.completed = applied.epoch;
      return applied.epoch;
    });
  }

  /**
   * Finishes a failed apply by re-applying its persisted stage (recover()), up to `attempts`
   * times `delayMs` apart. Afterwards lastApplied() names a whole state again. Throws
   * ERR_CKPT_HALF_APPLIED when the stage still cannot be applied: the RAM file then mixes two
   * checkpoints and no state on this host may be resumed. A store that is not broken is left alone.
   */
  async repair(attempts = 3, delayMs = 200): Promise<RecoverReport | null> {
    if (!this.broken) return null;
    let last: unknown;
    for (let i = 0; i < attempts; i++) {
      if (i > 0) await new Promise((r) => setTimeout(r, delayMs));
      try {
        return await this.recover();
      } catch (e) {
        last = e;
        this.broken = true;
      }
    }
    const err = last as TetherError;
    throw new TetherError('ERR_CKPT_HALF_APPLIED', `a checkpoint is half applied and cannot be finished: ${err.message}`, {
      cause: err.code ?? 'ERR_CKPT_IO',
    });
  }

  /**
   * Records, durably, that the migration completed with `finalEpoch` as its last checkpoint.
   * Refuses (ERR_COMPLETE_EPOCH) unless finalEpoch is exactly the applied one: the destination
   * must not take the VM from a state the source does not hold whole.
   */
  recordCompleted(finalEpoch: number): Promise<void> {
    return this.exclusive(async () => {
      const applied = this.applied;
      if (applied === null) throw new TetherError('ERR_CKPT_NOT_INITIALIZED', 'complete before init0/recover');
      if (this.broken) throw new TetherError('ERR_CKPT_STORE_BROKEN', 'an earlier apply failed');
      if (!Number.isSafeInteger(finalEpoch) || finalEpoch !== applied.epoch) {
        throw new TetherError('ERR_COMPLETE_EPOCH', `asked to complete at checkpoint ${finalEpoch}, applied is ${applied.epoch}`, {
          finalEpoch,
          applied: applied.epoch,
        });
      }
      try {
        await writeRecord(path.join(this.dir, COMPLETED), [encodeCompleted(finalEpoch)]);
      } catch (e) {
        throw ioError('recording completion', e);
      }
      this.completed = finalEpoch;
    });
  }

  /** Final epoch recorded by recordCompleted in `dir`, or null. ERR_CKPT_COMPLETED_CORRUPT if damaged. */
  static async readCompleted(dir: string): Promise<number | null> {
    let text: string;
    try {
      text = await readFile(path.join(dir, COMPLETED), 'utf8');
    } catch (e) {
      if (isEnoent(e)) return null;
      throw ioError('reading completion record', e);
    }
    return decodeCompleted(text);
  }

  /**
   * Start-up: loads the applied record, re-applies a valid stage of the next epoch, discards
   * any other stage. Throws ERR_CKPT_NOT_INITIALIZED when there is no applied record,
   * ERR_CKPT_APPLIED_CORRUPT / ERR_CKPT_DEVSTATE_CORRUPT when the durable state is damaged.
   */
  recover(): Promise<RecoverReport> {
    return this.exclusive(async () => {
      await this.removeTmpFiles();
      this.completed = await CheckpointStore.readCompleted(this.dir);
      let text: string;
      try {
        text = await readFile(path.join(this.dir, APPLIED), 'utf8');
      } catch (e) {
        if (isEnoent(e)) throw new TetherError('ERR_CKPT_NOT_INITIALIZED', `no applied record in ${this.dir}`);
        throw ioError('reading applied record', e);
      }
      const record = decodeRecord(text);
      await this.checkDevstate(record);
      this.applied = { epoch: record.epoch, devstate: record.devstate };
      this.broken = false;

      const stage = await this.recoverStage(record.epoch);
      await this.removeUnreferenced();
      return { ...this.lastApplied(), stage };
    });
  }

  private async recoverStage(appliedEpoch: number): Promise<RecoverReport['stage']> {
    const stagePath = path.join(this.dir, STAGE);
    let file: Buffer;
    try {
      file = await readFile(stagePath);
    } catch (e) {
      if (isEnoent(e)) return { action: 'none' };
      throw ioError('reading stage', e);
    }
    const discard = async (stage: RecoverReport['stage']): Promise<RecoverReport['stage']> => {
      await rm(stagePath, { force: true });
      await fsyncDir(this.dir);
      return stage;
    };
    let ckpt: Checkpoint;
    try {
      ckpt = decodeStage(file);
      validateCheckpoint(ckpt, this.ramPages);
    } catch (e) {
      if (!isTetherError(e)) throw e;
      const reason = e.code.startsWith('ERR_STAGE_') ? 'corrupt' : 'invalid';
      return discard({ action: 'discarded', reason, code: e.code });
    }
    if (ckpt.epoch <= appliedEpoch) return discard({ action: 'discarded', reason: 'stale', epoch: ckpt.epoch });
    if (ckpt.epoch !== appliedEpoch + 1) {
      return discard({ action: 'discarded', reason: 'epoch-gap', epoch: ckpt.epoch });
    }
    try {
      await this.checkRamFile();
      await this.applyStaged(ckpt);
    } catch (e) {
      this.broken = true;
      throw ioError(`re-applying staged checkpoint ${ckpt.epoch}`, e);
    }
    return { action: 'reapplied', epoch: ckpt.epoch };
  }

  /**
   * Steps (b)–(f) of apply; idempotent, so recover() can repeat them. `devstateWritten`: apply()
   * wrote devstate-k.bin already (before the first page).
   */
  private async applyStaged(ckpt: Checkpoint, devstateWritten = false): Promise<void> {
    const record: AppliedRecord = { epoch: ckpt.epoch, devstate: devstateName(ckpt.epoch) };
    if (!devstateWritten) await writeAtomic(path.join(this.dir, record.devstate), [ckpt.devstate]);
    await this.writePages(ckpt);
    if (this.disk !== undefined && ckpt.disk.length > 0) {
      // In issue order: a later extent wins where it overlaps an earlier one.
      for (const d of ckpt.disk) {
        if (d.zero) await this.disk.zero(d.offset, d.length);
        else await this.disk.pwrite(d.offset, d.data);
      }
      await this.disk.flush();
    }
    await writeRecord(path.join(this.dir, APPLIED), [encodeRecord(record, ckpt.devstate)]);
    this.applied = record;
    // Best effort from here: losing these unlinks is harmless (recover() discards a stage that
    // is not newer and removes device-state files the record does not name).
    await rm(path.join(this.dir, STAGE), { force: true }).catch(() => undefined);
    await this.removeUnreferenced().catch(() => undefined);
  }

  /** pwrites pages at pfn × 4096 in ascending pfn order, contiguous pfns as one writev. */
  private async writePages(ckpt: Checkpoint): Promise<void> {
    const { pfns, zeroMask, data } = ckpt;
    const n = pfns.length;
    if (n === 0) return;
    const dataIndex = new Int32Array(n);
    for (let i = 0, k = 0; i < n; i++) dataIndex[i] = zeroMask[i] === 1 ? -1 : k++;
    const order = new Uint32Array(n);
    for (let i = 0; i < n; i++) order[i] = i;
    order.sort((a, b) => pfns[a]! - pfns[b]!);

    const page = (i: number): Buffer => {
      const k = dataIndex[i]!;
      return k < 0 ? ZERO_PAGE : data.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
    };
    const fh = await open(this.ramPath, 'r+');
    try {
      let j = 0;
      while (j < n) {
        const start = pfns[order[j]!]!;
        const run: Buffer[] = [page(order[j]!)];
        j++;
        while (j < n && pfns[order[j]!] === start + run.length) {
          run.push(page(order[j]!));
          j++;
        }
        await writeAll(fh, run, start * PAGE_SIZE);
        // fault injection: the first checkpoint >= epoch that has pages (an empty one writes none)
        if (this.failPages !== undefined && ckpt.epoch >= this.failPages.epoch && j >= n / 2) {
          if (!this.failPages.sticky) this.failPages = undefined;
          throw Object.assign(new Error(`EIO: injected failure after ${j} of ${n} pages`), { code: 'EIO' });
        }
      }
      await fh.datasync();
    } finally {
      await fh.close();
    }
  }

  private async checkRamFile(): Promise<void> {
    let size: number;
    try {
      size = (await stat(this.ramPath)).size;
    } catch (e) {
      throw new TetherError('ERR_CKPT_RAM_FILE', `RAM file ${this.ramPath} unusable: ${(e as Error).message}`);
    }
    if (size < this.ramBytes) {
      throw new TetherError('ERR_CKPT_RAM_FILE', `RAM file ${this.ramPath} has ${size} bytes, expected ${this.ramBytes}`);
    }
  }

  private async checkDevstate(r: ReturnType<typeof decodeRecord>): Promise<void> {
    let buf: Buffer;
    try {
      buf = await readFile(path.join(this.dir, r.devstate));
    } catch (e) {
      throw new TetherError('ERR_CKPT_DEVSTATE_CORRUPT', `device state ${r.devstate} unreadable: ${(e as Error).message}`);
    }
    if (buf.length !== r.devstateBytes || crc32(buf) !== r.devstateCrc32) {
      throw new TetherError('ERR_CKPT_DEVSTATE_CORRUPT', `device state ${r.devstate} does not match the applied record`);
    }
  }

  /** Removes device-state files the applied record does not name (best effort). */
  private async removeUnreferenced(): Promise<void> {
    const keep = this.applied?.devstate;
    for (const name of await this.list()) {
      if (DEVSTATE_RE.test(name) && name !== keep) await rm(path.join(this.dir, name), { force: true });
    }
  }

  private async removeTmpFiles(): Promise<void> {
    for (const name of await this.list()) {
      if (name.endsWith('.tmp')) await rm(path.join(this.dir, name), { force: true });
    }
  }

  private async list(): Promise<string[]> {
    try {
      return await readdir(this.dir);
    } catch (e) {
      if (isEnoent(e)) return [];
      throw e;
    }
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }
}
