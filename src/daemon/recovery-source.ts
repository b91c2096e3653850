/**
 * Recovery after a sidecar restart, source side: the migration marker says this host was
 * sending the VM. Three cases, by what the records prove:
 *  - completion recorded (completed.json): the VM is the destination's; drop this copy and
 *    repeat the answer (recoverCompleted);
 *  - a rollback recorded a restored QEMU: it runs the VM, adopt it (adoptRestored);
 *  - otherwise (recoverSource): before switchover (no applied checkpoint) cancel the
 *    migration and keep the old QEMU; past switchover restore the last applied checkpoint.
 */
import fs from 'node:fs/promises';
import { CheckpointStore } from '../checkpoint/store.ts';
import { ImageSink } from '../disk/image-sink.ts';
import { isTetherError, TetherError } from '../errors.ts';
import { cleanupCrashPoint } from '../migrate/faults.ts';
import { notifyDestination } from '../migrate/completion/notify.ts';
import { cont, MIGRATION_ACTIVE, migrateCancel, queryMigrate, queryStatus } from '../qemu/commands.ts';
import type { QemuIdentity } from '../qemu/process.ts';
import { errorFields, ignored } from '../util/log.ts';
import type { Logger } from '../util/log.ts';
import { sleep } from '../util/time.ts';
import type { MigrationMarker, VmInstance } from '../vm/instance.ts';
import { resumePaused, runAdopted } from './adopted.ts';
import type { DaemonContext } from './context.ts';
import { distinct, killQemu, QMP_RECOVERY_MS, same } from './qemu-records.ts';
import { parseHostPort } from './sockets.ts';

/** How long a restored source keeps telling the destination it rolled back (as SourceMigration's ROLLED_BACK_NOTIFY_MS). */
const ROLLED_BACK_NOTIFY_MS = 10 * 60_000;

/** A source's marker: which of the three cases holds, acted on. Returns whether the marker stays. */
export async function recoverSourceSide(
  ctx: DaemonContext,
  vm: VmInstance,
  marker: MigrationMarker,
  recorded: QemuIdentity | null,
  migrating: QemuIdentity | null,
  log: Logger,
): Promise<boolean> {
  if ((await CheckpointStore.readCompleted(vm.checkpointDir)) !== null) {
    await recoverCompleted(ctx, vm, distinct(recorded, migrating), marker, log);
    return true;
  }
  // A QEMU other than the one that was migrating was started by a rollback
  // that got as far as recording it: it runs the VM now (or is about to: it may still
  // wait, paused, for its NICs and `cont`), so it is adopted, never restored over.
  if (recorded && !(migrating && same(recorded, migrating))) {
    if (migrating) await killQemu(migrating);
    await vm.adopt(recorded);
    await runAdopted(ctx, vm, log);
    log.warn('sidecar restarted after a rollback had restored the VM: adopted the restored QEMU', { pid: recorded.pid });
  } else {
    await recoverSource(ctx, vm, migrating, marker, log);
  }
  return false;
}

/**
 * The source recorded completion before the sidecar died: the VM belongs to the
 * destination, whatever state the channel was in. Never resume it here; drop this host's
 * copy and repeat the answer until the destination confirms (it waits with its guest paused).
 */
async function recoverCompleted(ctx: DaemonContext, vm: VmInstance, qemus: QemuIdentity[], marker: MigrationMarker, log: Logger) {
  const { migrationId } = marker;
  const finalEpoch = (await CheckpointStore.readCompleted(vm.checkpointDir))!;
  for (const q of qemus) await killQemu(q);
  await fs.rm(vm.ramFile, { force: true });
  vm.place = 'gone';
  vm.lastMigration = { migrationId, outcome: 'completed', reason: 'sidecar-restart', finalEpoch, handover: 'pending' };
  ctx.metrics.migrations.inc({ role: 'source', outcome: 'completed' });
  log.warn('sidecar restarted after the migration completed: the VM is not resumed here', { migrationId, finalEpoch });
  void notifyDestination({
    psk: ctx.host.peer.key,
    to: parseHostPort(marker.peer),
    migrationId,
    vm: vm.name,
    outcome: 'completed',
    epoch: finalEpoch,
    log,
  }).then(async (handover) => {
    vm.lastMigration = { ...vm.lastMigration, handover };
    await vm
      .dropCompletedSource(cleanupCrashPoint(ctx.faults))
      .catch((e: unknown) =>
        log.warn('dropping the completed source records failed: the next start answers again', { error: errorFields(e) }),
      );
  });
}

/** The last applied checkpoint in the store (a persisted stage re-applied whole, its disk extents too), or null before switchover. */
async function lastApplied(vm: VmInstance, log: Logger): Promise<{ epoch: number; devstatePath: string } | null> {
  const sink = vm.config.disk ? new ImageSink(vm.config.disk.image) : undefined;
  const store = new CheckpointStore({
    dir: vm.checkpointDir,
    ramPath: vm.ramFile,
    ramBytes: vm.ramBytes,
    ...(sink ? { disk: sink } : {}),
  });
  try {
    const rep = await store.recover();
    const last = store.lastApplied();
    log.info('checkpoint store recovered', { report: rep as unknown as Record<string, unknown>, epoch: last.epoch });
    return last;
  } catch (e) {
    if (!isTetherError(e, 'ERR_CKPT_NOT_INITIALIZED')) throw e;
    return null;
  } finally {
    await sink?.close();
  }
}

async function recoverSource(ctx: DaemonContext, vm: VmInstance, pid: QemuIdentity | null, marker: MigrationMarker, log: Logger) {
  const { migrationId } = marker;
  const last = await lastApplied(vm, log);
  if (last === null) {
    // Before switchover: the old QEMU still owns the VM.
    if (!pid) throw new TetherError('ERR_RECOVERY', 'no checkpoint and no QEMU: the VM is lost');
    await vm.adopt(pid);
    await cancelPrecopy(vm, log);
    vm.place = 'running';
    vm.lastMigration = { migrationId, outcome: 'rolled-back', reason: 'sidecar-restart', rollback: { epoch: null } };
    log.warn('migration interrupted before switchover by a sidecar restart: cancelled, VM kept', { migrationId });
    return;
  }
  if (pid) await killQemu(pid);
  await vm.restoreFrom(last.devstatePath);
  // NICs before the VM runs (and so before the announcement)
  await resumePaused(ctx, vm);
  vm.place = 'running';
  vm.lastMigration = { migrationId, outcome: 'rolled-back', reason: 'sidecar-restart', rollback: { epoch: last.epoch } };
  ctx.metrics.rollbacks.inc({ reason: 'sidecar-restart' });
  log.warn('migration interrupted by a sidecar restart: resumed from the last applied checkpoint', { migrationId, epoch: last.epoch });
  // The destination may have asked to complete and be waiting, paused, for the answer.
  void notifyDestination({
    psk: ctx.host.peer.key,
    to: parseHostPort(marker.peer),
    migrationId,
    vm: vm.name,
    outcome: 'rolled-back',
    epoch: last.epoch,
    log,
    giveUpAfterMs: ROLLED_BACK_NOTIFY_MS,
  });
}

/**
 * The adopted pre-switchover QEMU: its outgoing migration cancelled (waited out, at most
 * 250 polls), then running. Same steps as SourceMigration's #cancelPrecopy, bounded per command.
 */
async function cancelPrecopy(vm: VmInstance, log: Logger): Promise<void> {
  const q = vm.qemu!.qmp;
  const bound = { timeoutMs: QMP_RECOVERY_MS };
  await migrateCancel(q, bound).catch(ignored(log, 'no migration may be left to cancel'));
  for (let i = 0; i < 250; i++) {
    const m = await queryMigrate(q, bound);
    if (!MIGRATION_ACTIVE.includes(m.status ?? '')) break;
    await sleep(20);
  }
  const st = await queryStatus(q);
  if (st.status !== 'running') await cont(q);
}
