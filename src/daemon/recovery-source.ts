/**
 * Recovery after a sidecar restart, source side: the migration marker says this host was
 * sending the VM. Three cases, by what the records prove:
 *  - completion recorded (completed.json): the VM is the destination's; drop this copy and
 *    repeat the answer (recoverCompleted);
 *  - a rollback recorded a restored QEMU: it runs the VM, adopt it (runAdopted);
 *  - otherwise (recoverSource): before switchover (no applied checkpoint) cancel the
 *    migration and keep the old QEMU; past switchover restore the last applied checkpoint.
 * Each case runs the live path's own steps: the rollback's cancelPrecopy (source/rollback.ts),
 * its proof, cold restore and answer (source/restore.ts), the completion's last step
 * (completion/source.ts); only the records and their reading are recovery's own.
 */
import fs from 'node:fs/promises';
import { CheckpointStore } from '../checkpoint/store.ts';
import { TetherError } from '../errors.ts';
import { notifyDestination } from '../migrate/completion/notify.ts';
import { dropWhenAnswered } from '../migrate/completion/source.ts';
import { cancelPrecopy } from '../migrate/source/rollback.ts';
import { notifyRolledBack, recoverLastApplied, runRestored } from '../migrate/source/restore.ts';
import type { QemuIdentity } from '../qemu/process.ts';
import type { Logger } from '../util/log.ts';
import type { MigrationMarker, VmInstance } from '../vm/instance.ts';
import { runAdopted } from './adopted.ts';
import type { DaemonContext } from './context.ts';
import { distinct, killQemu, QMP_RECOVERY_MS, same } from './qemu-records.ts';
import { parseHostPort } from './sockets.ts';

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
  const answered = notifyDestination({
    psk: ctx.host.peer.key,
    to: parseHostPort(marker.peer),
    migrationId,
    vm: vm.name,
    outcome: 'completed',
    epoch: finalEpoch,
    log,
  }).then((handover) => {
    vm.lastMigration = { ...vm.lastMigration, handover };
  });
  // the live completion's own last step
  void dropWhenAnswered(vm, answered, ctx.faults, log);
}

async function recoverSource(ctx: DaemonContext, vm: VmInstance, pid: QemuIdentity | null, marker: MigrationMarker, log: Logger) {
  const { migrationId } = marker;
  const last = await recoverLastApplied(vm, log);
  if (last === null) {
    // Before switchover: the old QEMU still owns the VM.
    if (!pid) throw new TetherError('ERR_RECOVERY', 'no checkpoint and no QEMU: the VM is lost');
    await vm.adopt(pid);
    await cancelPrecopy(vm, log, { qmpTimeoutMs: QMP_RECOVERY_MS });
    vm.place = 'running';
    vm.lastMigration = { migrationId, outcome: 'rolled-back', reason: 'sidecar-restart', rollback: { epoch: null } };
    log.warn('migration interrupted before switchover by a sidecar restart: cancelled, VM kept', { migrationId });
    return;
  }
  if (pid) await killQemu(pid);
  // NICs before the VM runs (and so before the announcement), as the live rollback's cold path
  await runRestored(vm, { load: () => vm.restoreFrom(last.devstatePath), connectNics: () => ctx.nics.openPass(vm) });
  vm.place = 'running';
  vm.lastMigration = { migrationId, outcome: 'rolled-back', reason: 'sidecar-restart', rollback: { epoch: last.epoch } };
  ctx.metrics.rollbacks.inc({ reason: 'sidecar-restart' });
  log.warn('migration interrupted by a sidecar restart: resumed from the last applied checkpoint', { migrationId, epoch: last.epoch });
  // The destination may have asked to complete and be waiting, paused, for the answer.
  notifyRolledBack({ psk: ctx.host.peer.key, to: parseHostPort(marker.peer), migrationId, vm: vm.name, epoch: last.epoch, log });
}
