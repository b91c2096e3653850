/**
 * What a restarted sidecar does with the destination journal's write-ahead logs it
 * finds for a VM (docs/journal.md "Restart"). Decided before anything serves the disk:
 *
 *   the log holds a `completed` record   the source recorded completion: the journal's
 *                                        epochs after the final one are written into the
 *                                        image (write-back finished), the log removed;
 *                                        the VM's disk is then served pass-through.
 *   the destination asked to complete    outcome unknown: the journal is rebuilt from the
 *   (`completing` record, `finalEpoch`)  log (epochs > finalEpoch; the source holds the
 *                                        rest) and served in journal mode until the
 *                                        source answers: completed -> write-back,
 *                                        rolled-back -> discard. Never pass-through.
 *   anything else                        the incoming migration is fenced (today's
 *                                        recovery): the log is removed unread; nothing
 *                                        of it ever reaches the image.
 */
import { TetherError } from '../errors.ts';
import type { Logger } from '../util/log.ts';
import type { BlockDevice } from './block-device.ts';
import { BlockJournal, type JournalOptions } from './journal.ts';
import { findJournalLogs, JournalLog, removeJournalLog, replayJournalLog } from './journal-log.ts';

export type JournalRestart =
  | { kind: 'none' }
  /**
   * Written back (completion was in the log): serve pass-through. The log's completed record
   * (final epoch, migration) is the source's answer `completed`: D writes it only on that answer.
   */
  | { kind: 'written-back'; bytes: number; finalEpoch: number; migrationId: string }
  /** Dropped unread: the migration is fenced here. */
  | { kind: 'discarded' }
  /**
   * Rebuilt from the log: `device(image)` is the journal in journal mode, appending to its
   * log (the VM's diskDevice hook): serve it until the source answers.
   */
  | { kind: 'journal'; device: (image: BlockDevice) => BlockJournal; heldBytes: number; ignoredBytes: number };

export interface RestartOptions {
  journalDir: string;
  vm: string;
  /** The destination had asked to complete with this final epoch (its `completing` record), else null. */
  completingEpoch: number | null;
  /** The migration the record is for (null: none): a log of another migration is stale. */
  migrationId: string | null;
  journal: Omit<JournalOptions, 'wal' | 'writeThrough'>;
  /** The log's segment size when appended to again (VM config disk.journalSegmentBytes; default: one segment). */
  segmentBytes?: number;
  /** Opens the image to write a completed journal back into it. */
  openImage: () => Promise<BlockDevice>;
  log?: Logger;
}

export async function restartJournal(o: RestartOptions): Promise<JournalRestart> {
  const files = await findJournalLogs(o.journalDir, o.vm);
  if (files.length === 0) return { kind: 'none' };
  let result: JournalRestart = { kind: 'discarded' };
  for (const file of files) {
    // A header pass first (no data kept): is the outcome in the log?
    const head = await replayJournalLog(file, Number.MAX_SAFE_INTEGER);
    if (head.completed !== null) {
      const replay = await replayJournalLog(file, head.completed);
      const image = await o.openImage();
      let bytes: number;
      try {
        const j = BlockJournal.recover(image, replay, { ...o.journal, nextEpoch: head.completed + 1 });
        bytes = j.heldBytes;
        j.passThrough();
        await j.drained();
      } finally {
        await image.close();
      }
      await removeJournalLog(file);
      o.log?.warn('journal log held a completed migration: written back into the image', {
        file,
        finalEpoch: head.completed,
        migrationId: head.meta.migrationId,
        bytes,
      });
      if (result.kind !== 'journal')
        result = { kind: 'written-back', bytes, finalEpoch: head.completed, migrationId: head.meta.migrationId };
      continue;
    }
    if (o.completingEpoch !== null && head.meta.migrationId === o.migrationId && result.kind !== 'journal') {
      const replay = await replayJournalLog(file, o.completingEpoch);
      const wal = await JournalLog.reopen(file, replay, { ...(o.segmentBytes ? { segmentBytes: o.segmentBytes } : {}) });
      const opts = { ...o.journal, wal, nextEpoch: o.completingEpoch + 1 };
      const heldBytes = BlockJournal.recover(nullImage(), replay, opts).heldBytes;
      o.log?.warn('journal rebuilt from its log: served in journal mode until the source answers', {
        file,
        finalEpoch: o.completingEpoch,
        heldBytes,
        ignoredTailBytes: replay.ignoredBytes,
      });
      result = {
        kind: 'journal',
        device: (image) => BlockJournal.recover(image, replay, opts),
        heldBytes,
        ignoredBytes: replay.ignoredBytes,
      };
      continue;
    }
    await removeJournalLog(file);
    o.log?.warn('journal log of an interrupted incoming migration dropped: nothing of it reaches the image', { file });
  }
  return result;
}

/** Stands in for the image where only the journal's figures are wanted. */
function nullImage(): BlockDevice {
  const no = (): Promise<never> =>
    Promise.reject(new TetherError('ERR_DISK_CLOSED', 'no image: the journal is rebuilt here for its figures only'));
  return { size: Number.MAX_SAFE_INTEGER, canTrim: true, read: no, write: no, flush: no, trim: no, writeZeroes: no, close: async () => {} };
}
