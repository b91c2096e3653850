/**
 * Durable checkpoint state on S. This store and its helpers are the only files in checkpoint/
 * that touch the file system: store-files.ts (atomic replace, the reserve), store-records.ts
 * (the records' format, each checksummed), ram-pages.ts (validation, page writes).
 *
 * Files in `dir`:
 *   applied.json          the applied record: epoch, device-state file name, its length and CRC-32
 *   devstate-<k>.bin      device state of applied checkpoint k (QEMU `-incoming exec:cat` input)
 *   stage.bin             checkpoint being applied (stage.ts); exists only during apply
 *   completed.json        the completion record (epoch). Once it exists the migration is over: the
 *                         VM belongs to the destination, nothing is applied and the source never resumes.
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
import { mkdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { TetherError, isTetherError } from '../errors.ts';
import { ignored, type Logger } from '../util/log.ts';
import type { DiskExtent } from '../epoch/outputs.ts';
import type { Checkpoint } from './assembler.ts';
import { PAGE_SIZE } from './messages.ts';
import { checkRamFile, validateCheckpoint, writePages } from './ram-pages.ts';
import { decodeStage, encodeStage } from './stage.ts';
import { ensureReserve, fsyncDir, ioError, isEnoent, listDir, readIfExists, writeAtomic, writeRecord } from './store-files.ts';
import {
  checkDevstate,
  corruptApplied,
  decodeApplied,
  decodeCompleted,
  DEVSTATE_RE,
  devstateName,
  encodeApplied,
  encodeCompleted,
  type AppliedRecord,
} from './store-records.ts';

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
   * A hook for tests of a failing apply, set by the caller (never in production): writing
   * the pages of the first checkpoint >= `epoch` that has pages fails with ERR_CKPT_IO
   * (errno EIO) once half of them are in the RAM file, once or (sticky) on every attempt,
   * as a RAM tmpfs that runs full would.
   */
  failPages?: { epoch: number; sticky: boolean };
  /** Where best-effort steps that failed are logged (debug) and a missing reserve (warn). */
  log?: Logger;
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
  const text = await readIfExists(file, 'reading the completion request record');
  return text === null ? null : decodeCompleted(text, 'tether-completing');
}

export class CheckpointStore {
  private readonly dir: string;
  private readonly ramPath: string;
  private readonly ramBytes: number;
  private readonly ramPages: number;
  private readonly disk: DiskSink | undefined;
  private failPages: StoreOptions['failPages'];
  private readonly log: Logger | undefined;
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
    this.log = opts.log;
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
        await checkRamFile(this.ramPath, this.ramBytes);
        // A stage of an earlier migration must never be re-applied on top of this one.
        await rm(path.join(this.dir, STAGE), { force: true });
        await rm(path.join(this.dir, COMPLETED), { force: true });
        await fsyncDir(this.dir);
        this.completed = null;
        const record: AppliedRecord = { epoch: 0, devstate: 'devstate-0.bin' };
        await writeAtomic(path.join(this.dir, record.devstate), [devstate]);
        await writeRecord(path.join(this.dir, APPLIED), [encodeApplied(record, devstate)]);
        await ensureReserve(this.dir, this.log);
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
        await checkRamFile(this.ramPath, this.ramBytes);
        await writeAtomic(path.join(this.dir, STAGE), encodeStage(ckpt));
        // Before any page: a device-state file no record names yet (a full tmpfs fails here,
        // with the previous checkpoint whole).
        await writeAtomic(path.join(this.dir, devstateName(ckpt.epoch)), [ckpt.devstate]);
      } catch (e) {
        // Nothing but a tmp file, an unreferenced stage or device state may have changed.
        for (const f of [STAGE, `${STAGE}.tmp`, `${devstateName(ckpt.epoch)}.tmp`]) {
          await rm(path.join(this.dir, f), { force: true }).catch(ignored(this.log, 'cleaning up after a failed stage write'));
        }
        throw ioError('persisting stage', e);
      }
      const what = `applying checkpoint ${ckpt.epoch}`;
      try {
        await this.applyStaged(ckpt, what, true);
      } catch (e) {
        this.broken = true;
        throw ioError(what, e);
      }
      await ensureReserve(this.dir, this.log);
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
        throw corruptApplied(`unreadable: ${(e as Error).message}`);
      }
      const record = decodeApplied(text);
      if (record.epoch !== last.epoch || record.devstate !== this.applied!.devstate) {
        throw corruptApplied(`names checkpoint ${record.epoch}, the store applied ${last.epoch}`);
      }
      await checkDevstate(this.dir, record);
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
    const text = await readIfExists(path.join(dir, COMPLETED), 'reading completion record');
    return text === null ? null : decodeCompleted(text);
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
      const text = await readIfExists(path.join(this.dir, APPLIED), 'reading applied record');
      if (text === null) throw new TetherError('ERR_CKPT_NOT_INITIALIZED', `no applied record in ${this.dir}`);
      const record = decodeApplied(text);
      await checkDevstate(this.dir, record);
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
    const what = `re-applying staged checkpoint ${ckpt.epoch}`;
    try {
      await checkRamFile(this.ramPath, this.ramBytes);
      await this.applyStaged(ckpt, what);
    } catch (e) {
      this.broken = true;
      throw ioError(what, e);
    }
    return { action: 'reapplied', epoch: ckpt.epoch };
  }

  /**
   * Steps (b)–(f) of apply; idempotent, so recover() can repeat them. `what` names the step
   * in errors; `devstateWritten`: apply() wrote devstate-k.bin already (before the first page).
   */
  private async applyStaged(ckpt: Checkpoint, what: string, devstateWritten = false): Promise<void> {
    const record: AppliedRecord = { epoch: ckpt.epoch, devstate: devstateName(ckpt.epoch) };
    if (!devstateWritten) await writeAtomic(path.join(this.dir, record.devstate), [ckpt.devstate]);
    await writePages(this.ramPath, ckpt, this.pagesHook(ckpt.epoch, what));
    if (this.disk !== undefined && ckpt.disk.length > 0) {
      // In issue order: a later extent wins where it overlaps an earlier one.
      for (const d of ckpt.disk) {
        if (d.zero) await this.disk.zero(d.offset, d.length);
        else await this.disk.pwrite(d.offset, d.data);
      }
      await this.disk.flush();
    }
    await writeRecord(path.join(this.dir, APPLIED), [encodeApplied(record, ckpt.devstate)]);
    this.applied = record;
    // Best effort from here: losing these unlinks is harmless (recover() discards a stage that
    // is not newer and removes device-state files the record does not name).
    await rm(path.join(this.dir, STAGE), { force: true }).catch(ignored(this.log, 'recover() discards a stage that is not newer'));
    await this.removeUnreferenced().catch(ignored(this.log, 'recover() removes device-state files the record does not name'));
  }

  /**
   * The failPages hook (StoreOptions) as writePages' afterRun for checkpoint `epoch`: throws
   * once half of its pages are written. `what` names the apply in the error's message.
   */
  private pagesHook(epoch: number, what: string): ((written: number, total: number) => void) | undefined {
    if (this.failPages === undefined || epoch < this.failPages.epoch) return undefined;
    return (written, total) => {
      const f = this.failPages;
      if (f === undefined || written < total / 2) return;
      if (!f.sticky) this.failPages = undefined;
      throw new TetherError('ERR_CKPT_IO', `${what}: EIO: the failPages hook failed the page writes after ${written} of ${total} pages`, {
        errno: 'EIO',
      });
    };
  }

  /** Removes device-state files the applied record does not name (best effort). */
  private async removeUnreferenced(): Promise<void> {
    const keep = this.applied?.devstate;
    for (const name of await listDir(this.dir)) {
      if (DEVSTATE_RE.test(name) && name !== keep) await rm(path.join(this.dir, name), { force: true });
    }
  }

  private async removeTmpFiles(): Promise<void> {
    for (const name of await listDir(this.dir)) {
      if (name.endsWith('.tmp')) await rm(path.join(this.dir, name), { force: true });
    }
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    // The caller of `fn` gets its failure through `run`; the queue only orders the steps.
    this.queue = run.catch(ignored(this.log, 'reported to the caller of that store step'));
    return run;
  }
}
