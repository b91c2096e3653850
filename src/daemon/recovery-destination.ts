/**
 * Recovery after a sidecar restart, destination side: the migration marker says this host
 * was receiving the VM. Two cases:
 *  - mid-window, no completion asked (no completing.json): fence; the source rolls back on
 *    its own (fenceInterrupted);
 *  - completion asked, the answer not yet acted on: keep the incoming QEMU, paused, until
 *    the source answers (recoverCompleting, then answerRecovered); if the journal log already
 *    recorded the answer `completed` (killed during the write-back), act on it at once.
 * Each step is the live destination's own (src/migrate/completion/destination.ts: stopForAnswer,
 * decideAnswer, runHere; src/migrate/destination/fence.ts: fenceVm), on the recovered VM.
 */
import type { BlockJournal } from '../disk/journal.ts';
import { findJournalLogs, removeJournalLog } from '../disk/journal-log.ts';
import { TetherError } from '../errors.ts';
import { decideAnswer, runHere, stopForAnswer } from '../migrate/completion/destination.ts';
import type { Resolve, ResolveAnswer } from '../migrate/completion/destination.ts';
import { fenceVm } from '../migrate/destination/fence.ts';
import { cleanupCrashPoint } from '../migrate/faults.ts';
import { identityAlive } from '../qemu/process.ts';
import type { QemuIdentity } from '../qemu/process.ts';
import { errorFields } from '../util/log.ts';
import type { Logger } from '../util/log.ts';
import { passThroughDevice } from '../vm/instance.ts';
import type { MigrationMarker, VmInstance } from '../vm/instance.ts';
import type { AwaitingAnswer, DaemonContext } from './context.ts';
import { killQemu, QMP_RECOVERY_MS, same } from './qemu-records.ts';

/** What the restarted journal says of the window (recovery.ts restartDisk). */
export interface DiskAtRestart {
  /** The journal rebuilt from its log, once QEMU opened the disk; undefined without one. */
  journal: () => BlockJournal | undefined;
  /** The journal log recorded the source's answer `completed` (and was written back). */
  answeredCompleted: { finalEpoch: number; migrationId: string } | null;
}

/**
 * Mid-window, no completion asked: every QEMU of the VM killed (by the identity its records
 * name: none is adopted), then the live fence's steps (RAM, records); the source rolls back.
 */
export async function fenceInterrupted(vm: VmInstance, qemus: QemuIdentity[], marker: MigrationMarker, log: Logger): Promise<void> {
  for (const q of qemus) await killQemu(q);
  await fenceVm(vm, log);
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
    // The journal was never opened (no QEMU): its logs go, as the live fence discards it.
    for (const f of await findJournalLogs(vm.journalDir, vm.name)) await removeJournalLog(f);
    vm.diskDevice = passThroughDevice;
    await fenceVm(vm, log);
    log.error('asked to complete, but the incoming QEMU is gone: the VM may be lost', { migrationId, finalEpoch: epoch });
    return;
  }
  if (identityAlive(migrating)) process.kill(migrating.pid, 'SIGCONT');
  await vm.adopt(migrating);
  const j = journal();
  if (!(await stopForAnswer(vm, j, { timeoutMs: QMP_RECOVERY_MS }))) {
    throw new TetherError('ERR_RECOVERY', `the incoming QEMU pid ${migrating.pid} exited before it could be paused`, {
      pid: migrating.pid,
    });
  }
  vm.place = 'migrating-in';
  ctx.awaitingAnswer.set(vm.name, { vm, epoch, migrationId, ...(j ? { journal: j } : {}) });
  log.warn('sidecar restarted during the completion handshake: guest paused until the source answers', {
    migrationId,
    finalEpoch: epoch,
  });
}

/**
 * The source's answer for a VM recovered by recoverCompleting, decided as the live destination
 * decides it (decideAnswer); known=false if none waits for it, and never acted on when it
 * names another migration than the one that waits (a retried answer to an earlier migration
 * of the VM: ERR_MIGRATION_ID_MISMATCH).
 */
export function answerRecovered(ctx: DaemonContext, c: Resolve & { vm: string }): ResolveAnswer {
  const name = c.vm;
  const w = ctx.awaitingAnswer.get(name);
  if (!w) return { known: false, code: 'ERR_NO_MIGRATION', message: `VM ${name} is not migrating in to ${ctx.host.name}` };
  const log = ctx.log.child({ vm: name, migrationId: w.migrationId });
  // It waits for the answer to its own request only: not held by the source, not completed.
  const state = { id: w.migrationId, finalEpoch: w.epoch, completed: false, held: false, stopped: false };
  const d = decideAnswer(state, c, log, () => ctx.metrics.staleResolves.inc());
  if (d.act) {
    ctx.awaitingAnswer.delete(name);
    void actOnAnswer(ctx, w, d.act, c.epoch, log).catch((e) => log.error('acting on the source answer failed', { error: errorFields(e) }));
  }
  return d.answer;
}

/** `finish` (completed): the live completion's steps, the VM runs here; `fence` (rolled-back): the live fence's. */
async function actOnAnswer(ctx: DaemonContext, w: AwaitingAnswer, act: 'finish' | 'fence', epoch: number, log: Logger) {
  const { vm, journal } = w;
  if (act === 'finish') {
    const release = (): void => {
      journal?.passThrough();
      vm.place = 'running';
      log.info('the source answered completed: the VM runs here', { finalEpoch: epoch });
    };
    // The window's filters still send the guest's frames to the dead sidecar's relays: off
    // before the guest resumes, so its first frames reach the tap.
    await ctx.nics.attachHere(vm);
    await runHere({ vm, journal, log, paused: true, release, afterStep: cleanupCrashPoint(ctx.faults) }, epoch);
  } else {
    journal?.discard();
    await fenceVm(vm, log);
    log.warn('the source answered rolled-back: fenced');
  }
  // recovery left this VM's NICs alone while it was migrating in: its place is known now
  // (running: its ports are open already, so this does nothing more; fenced: TAPs removed)
  await ctx.nics.settle(vm);
}
