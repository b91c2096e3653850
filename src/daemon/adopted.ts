/**
 * A running QEMU taken over by this sidecar (after a restart, or by `tether vm adopt`): its
 * disk window closed if it still reads its disk through the sidecar (the live completion's
 * closeDiskWindow), and a restored QEMU found paused resumed with the live rollback's own
 * steps (runRestored: NICs, `cont`, announcement).
 */
import { TetherError } from '../errors.ts';
import { closeDiskWindow } from '../migrate/completion/destination.ts';
import { runRestored } from '../migrate/source/restore.ts';
import { queryStatus } from '../qemu/commands.ts';
import type { Logger } from '../util/log.ts';
import type { VmInstance } from '../vm/instance.ts';
import type { DaemonContext } from './context.ts';
import { QMP_RECOVERY_MS } from './qemu-records.ts';

/** A restored QEMU waiting paused: NICs connected, `cont`, MAC announcement, as a live rollback does it. */
export async function resumePaused(ctx: DaemonContext, vm: VmInstance): Promise<void> {
  // nothing to load: the QEMU holds its restored state already
  await runRestored(vm, { load: async () => {}, connectNics: () => ctx.nics.openPass(vm) });
}

/**
 * An adopted QEMU must be running before the VM is shown running. A restored or promoted
 * QEMU (no configuration section: sendConfiguration false) found paused or still loading is
 * resumed the way a live rollback does it - NICs connected, `cont`, MAC announcement;
 * anything else not running is not guessed at (ERR_RECOVERY: the VM is left unrecovered).
 */
export async function runAdopted(ctx: DaemonContext, vm: VmInstance, log: Logger): Promise<void> {
  const q = vm.qemu!;
  // Its sidecar died inside the window, after the source's `completed`: the journal died
  // with it, the restarted one serves the image (VmInstance.adopt) until the switch, done here.
  await closeDiskWindow(vm, undefined, log);
  const { status } = await queryStatus(q.qmp, { timeoutMs: QMP_RECOVERY_MS });
  // 'suspended': the guest put itself to sleep (ACPI S3); it runs as far as tether is concerned
  if (status !== 'running' && status !== 'suspended') {
    if (vm.sendConfiguration || !['paused', 'inmigrate', 'prelaunch'].includes(status)) {
      throw new TetherError('ERR_RECOVERY', `QEMU pid ${q.pid} is ${status}, not running, and no record says why`, {
        pid: q.pid,
        status,
      });
    }
    await resumePaused(ctx, vm);
    log.warn('restored QEMU found paused after a sidecar restart: resumed and announced', { pid: q.pid, was: status });
  }
  vm.place = 'running';
}
