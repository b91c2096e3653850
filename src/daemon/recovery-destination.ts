/**
 * Recovery after a sidecar restart, destination side: the migration marker says this host
 * was receiving the VM. Two cases:
 *  - mid-window, no completion asked (no completing.json): fence; the source rolls back on
 *    its own (fenceInterrupted);
 *  - completion asked, the answer not yet acted on: keep the incoming QEMU, paused, until
 *    the source answers (recoverCompleting, then answerRecovered); if the journal log already
 *    recorded the answer `completed` (killed during the write-back), act on it at once.
 */
import fs from 'node:fs/promises';
import type { BlockJournal } from '../disk/journal.ts';
import { findJournalLogs } from '../disk/journal-log.ts';
import { completingRecordPath, staleResolve } from '../migrate/destination.ts';
import type { ResolveAnswer } from '../migrate/destination.ts';
import { cleanupCrashPoint } from '../migrate/faults.ts';
import { cont, stop } from '../qemu/commands.ts';
import { identityAlive } from '../qemu/process.ts';
import type { QemuIdentity } from '../qemu/process.ts';
import { errorFields } from '../util/log.ts';
import type { Logger } from '../util/log.ts';
import { passThroughDevice } from '../vm/instance.ts';
import type { MigrationMarker, VmInstance } from '../vm/instance.ts';
import { closeAdoptedWindow } from './adopted.ts';
import type { AwaitingAnswer, DaemonContext } from './context.ts';
import { killQemu, QMP_RECOVERY_MS, same } from './qemu-records.ts';

/** What the restarted journal says of the window (recovery.ts restartDisk). */
export interface DiskAtRestart {
  /** The journal rebuilt from its log, once QEMU opened the disk; undefined without one. */
  journal: () => BlockJournal | undefined;
  /** The journal log recorded the source's answer `completed` (and was written back). */
  answeredCompleted: { finalEpoch: number; migrationId: string } | null;
}

/** Mid-window, no completion asked: every QEMU of the VM killed, its RAM dropped; the source rolls back. */
export async function fenceInterrupted(vm: VmInstance, qemus: QemuIdentity[], marker: MigrationMarker, log: Logger): Promise<void> {
  for (const q of qemus) await killQemu(q);
  await vm.removeRam();
  vm.place = 'fenced';
  log.warn('incoming migration interrupted by a sidecar restart: fenced', { migrationId: marker.migrationId });
}

/** Completion asked before the restart: wait for the answer, or act on the one the journal log recorded. */
export async function recoverAsked(
  ctx: DaemonContext,
  vm: VmInstance,
  q: { recorded: QemuIdentity | null; migrating: QemuIdentity | null },
  marker: MigrationMarker,
  epoch: number,
  disk: DiskAtRestart,
  log: Logger,
): Promise<void> {
  // vm.json names the incoming QEMU too; any other QEMU recorded for the VM is not it
  if (q.recorded && !(q.migrating && same(q.recorded, q.migrating))) await killQemu(q.recorded);
  await recoverCompleting(ctx, vm, q.migrating, marker, epoch, log, disk.journal);
  const answered = disk.answeredCompleted;
  if (answered?.migrationId === marker.migrationId && answered.finalEpoch === epoch && vm.place === 'migrating-in') {
    // Killed during the write-back, before the completion records were dropped: the
    // source had answered `completed` (the log says so) and had this side's RESOLVED, so
    // it does not answer again. Its answer is known: act on it now.
    log.warn('the journal log recorded the source answer completed: the VM runs here', {
      migrationId: marker.migrationId,
      finalEpoch: epoch,
    });
    answerRecovered(ctx, { vm: vm.name, migrationId: marker.migrationId, outcome: 'completed', epoch });
  }
}

/**
 * This host had asked the source to complete when its sidecar died: the source may have
 * recorded completion, so the incoming VM (frozen by its guard) is kept, paused, until the
 * source's answer arrives (peer-admission.ts). Between SIGCONT and QMP stop the guest runs
 * for a moment with its devices' backends gone: nothing it emits can leave the host.
 */
async function recoverCompleting(
  ctx: DaemonContext,
  vm: VmInstance,
  migrating: QemuIdentity | null,
  marker: MigrationMarker,
  epoch: number,
  log: Logger,
  journal: () => BlockJournal | undefined,
): Promise<void> {
  const { migrationId } = marker;
  if (migrating === null) {
    await vm.removeRam();
    for (const f of await findJournalLogs(vm.journalDir, vm.name)) await fs.rm(f, { force: true });
    vm.diskDevice = passThroughDevice;
    await fs.rm(completingRecordPath(vm), { force: true });
    vm.place = 'fenced';
    log.error('asked to complete, but the incoming QEMU is gone: the VM may be lost', { migrationId, finalEpoch: epoch });
    return;
  }
  if (identityAlive(migrating)) process.kill(migrating.pid, 'SIGCONT');
  await vm.adopt(migrating);
  await stop(vm.qemu!.qmp, { timeoutMs: QMP_RECOVERY_MS });
  vm.place = 'migrating-in';
  const j = journal();
  ctx.awaitingAnswer.set(vm.name, { vm, epoch, migrationId, ...(j ? { journal: j } : {}) });
  log.warn('sidecar restarted during the completion handshake: guest paused until the source answers', {
    migrationId,
    finalEpoch: epoch,
  });
}

/**
 * The source's answer for a VM recovered by recoverCompleting; known=false if none waits
 * for it, and never acted on when it names another migration than the one that waits (a
 * retried answer to an earlier migration of the VM: ERR_MIGRATION_ID_MISMATCH).
 */
export function answerRecovered(
  ctx: DaemonContext,
  c: { vm: string; migrationId: string; outcome: 'completed' | 'rolled-back'; epoch: number },
): ResolveAnswer {
  const { vm: name, outcome, epoch } = c;
  const w = ctx.awaitingAnswer.get(name);
  if (!w) return { known: false, code: 'ERR_NO_MIGRATION', message: `VM ${name} is not migrating in to ${ctx.host.name}` };
  const stale = staleResolve(w.migrationId, c.migrationId);
  if (stale) {
    ctx.metrics.staleResolves.inc();
    ctx.log.warn('ignored an answer for another migration of this VM', {
      vm: name,
      migrationId: w.migrationId,
      answerFor: c.migrationId,
      outcome,
      epoch,
    });
    return stale;
  }
  if (outcome === 'completed' && epoch !== w.epoch) {
    return { known: false, code: 'ERR_NO_MIGRATION', message: `no completion request of final epoch ${epoch}` };
  }
  ctx.awaitingAnswer.delete(name);
  const log = ctx.log.child({ vm: name, migrationId: w.migrationId });
  void actOnAnswer(ctx, w, outcome, epoch, log).catch((e) => log.error('acting on the source answer failed', { error: errorFields(e) }));
  return { known: true };
}

/** `completed`: the journal written back and the VM run here; `rolled-back`: fenced. Then the completion records go. */
async function actOnAnswer(ctx: DaemonContext, w: AwaitingAnswer, outcome: 'completed' | 'rolled-back', epoch: number, log: Logger) {
  const { vm, journal } = w;
  if (outcome === 'completed') {
    // The rebuilt journal goes into the image (the log records the outcome first);
    // writes of the resumed guest wait for that, reads see the journal meanwhile.
    await journal?.markCompleted(epoch);
    journal?.passThrough();
    await cont(vm.qemu!.qmp);
    vm.place = 'running';
    log.info('the source answered completed: the VM runs here', { finalEpoch: epoch });
    await journal?.drained();
    await closeAdoptedWindow(vm, log);
  } else {
    journal?.discard();
    await vm.killQemu();
    await vm.removeRam();
    vm.place = 'fenced';
    log.warn('the source answered rolled-back: fenced');
  }
  await vm.dropCompletingRecords(cleanupCrashPoint(ctx.faults));
}
