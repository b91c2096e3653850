/**
 * Running a restored QEMU: the last steps of a rollback past switchover, shared by the live
 * rollback (rollback.ts) and a restarted sidecar's recovery (daemon), so both run the same code.
 */
import { TetherError } from '../../errors.ts';
import { announceSelf, cont, queryStatus } from '../../qemu/commands.ts';
import { errorFields } from '../../util/log.ts';
import { nowMs, sleep } from '../../util/time.ts';
import type { VmInstance } from '../../vm/instance.ts';

export async function waitRunning(vm: VmInstance, timeoutMs = 60_000): Promise<void> {
  await waitStatus(vm, 'running', timeoutMs);
}

/** Until the VM's QEMU reports run state `status`; ERR_RESTORE_FAILED if it exits or takes longer than `timeoutMs`. */
export async function waitStatus(vm: VmInstance, status: string, timeoutMs: number): Promise<void> {
  const q = vm.qemu!;
  const deadline = nowMs() + timeoutMs;
  while (nowMs() < deadline) {
    if (q.hasExited) throw new TetherError('ERR_RESTORE_FAILED', `restored QEMU exited: ${q.stderrTail?.() ?? ''}`);
    if ((await queryStatus(q.qmp)).status === status) return;
    await sleep(10);
  }
  throw new TetherError('ERR_RESTORE_FAILED', `restored QEMU not ${status} after ${timeoutMs} ms`);
}

/** The MAC announcement of a restored VM once it runs (the live rollback and a restarted sidecar alike). */
export async function announceRestored(vm: VmInstance): Promise<void> {
  await announceSelf(vm.qemu!.qmp, { initial: 50, max: 550, rounds: 5, step: 100 });
}

/**
 * A restored QEMU (started with -S) has loaded its device state and waits paused:
 * `connectNics` runs first (the NICs are QEMU's own tap backends, which need nothing from
 * the sidecar; callers pass none), then it runs. A failing hook is logged; the VM runs
 * regardless.
 */
export async function resumeRestored(vm: VmInstance, connectNics: () => Promise<void> | undefined, timeoutMs = 60_000): Promise<void> {
  await waitStatus(vm, 'paused', timeoutMs);
  await Promise.resolve(connectNics())?.catch((e: unknown) =>
    vm.log.warn('NIC not reconnected before the restored VM runs', { error: errorFields(e) }),
  );
  await cont(vm.qemu!.qmp);
  await waitRunning(vm, timeoutMs);
}
