/**
 * Restoring the VM on the source: the steps of a rollback past switchover that a restarted
 * sidecar's recovery (daemon/recovery-source.ts) repeats, shared with the live rollback
 * (rollback.ts) so both run the same code: the checkpoint store opened on the VM's files, the
 * proof that the last applied checkpoint is whole, a restored QEMU run and announced, and the
 * destination told that the VM rolled back.
 */
import { CheckpointStore } from '../../checkpoint/store.ts';
import type { AppliedCheckpoint, StoreOptions } from '../../checkpoint/store.ts';
import { ImageSink } from '../../disk/image-sink.ts';
import { isTetherError, TetherError } from '../../errors.ts';
import { announceSelf, cont, queryStatus } from '../../qemu/commands.ts';
import { errorFields } from '../../util/log.ts';
import type { Logger } from '../../util/log.ts';
import { nowMs, sleep } from '../../util/time.ts';
import type { VmInstance } from '../../vm/instance.ts';
import { notifyDestination } from '../completion/notify.ts';
import type { NotifyOptions } from '../completion/notify.ts';

/** How long an answer of 'rolled-back' is retried: a destination that asked to complete waits paused for it. */
const ROLLED_BACK_NOTIFY_MS = 10 * 60_000;

/** The VM's checkpoint store (its disk extents written through an ImageSink of the image, if it has a disk). */
export function openSourceStore(
  vm: VmInstance,
  failPages?: StoreOptions['failPages'],
): { store: CheckpointStore; sink: ImageSink | undefined } {
  const disk = vm.config.disk;
  const sink = disk ? new ImageSink(disk.image) : undefined;
  const store = new CheckpointStore({
    dir: vm.checkpointDir,
    ramPath: vm.ramFile,
    ramBytes: vm.ramBytes,
    ...(failPages !== undefined ? { failPages } : {}),
    ...(sink ? { disk: sink } : {}),
  });
  return { store, sink };
}

/**
 * The last applied checkpoint, proven whole from disk: a half-applied one is first finished
 * from its persisted stage (ERR_CKPT_HALF_APPLIED if it cannot be), then the applied record and
 * its device-state file are verified (ERR_CKPT_*_CORRUPT). The live rollback's proof.
 */
export async function wholeCheckpoint(store: CheckpointStore): Promise<AppliedCheckpoint> {
  await store.repair();
  return store.verifyApplied();
}

/**
 * After a sidecar restart: the store recovered from the VM's files (a persisted stage re-applied
 * whole, its disk extents too) and its last applied checkpoint proven as the live rollback
 * proves it (wholeCheckpoint); null when there is none (before switchover).
 */
export async function recoverLastApplied(vm: VmInstance, log: Logger): Promise<AppliedCheckpoint | null> {
  const { store, sink } = openSourceStore(vm);
  try {
    const rep = await store.recover();
    const last = await wholeCheckpoint(store);
    log.info('checkpoint store recovered', { report: rep as unknown as Record<string, unknown>, epoch: last.epoch });
    return last;
  } catch (e) {
    if (!isTetherError(e, 'ERR_CKPT_NOT_INITIALIZED')) throw e;
    return null;
  } finally {
    await sink?.close();
  }
}

/**
 * A restored QEMU brought up and run: `load` starts it paused with the device state (a fresh
 * QEMU, or the hot standby taking over), `beforeResume` runs next (a fault point), then NICs,
 * `cont` and the MAC announcement (resumeRestored, announceRestored). Returns when it ran and
 * when it was announced (nowMs).
 */
export async function runRestored(
  vm: VmInstance,
  p: { load: () => Promise<void>; connectNics: () => Promise<void> | undefined; beforeResume?: () => void },
): Promise<{ resumedAt: number; announcedAt: number }> {
  await p.load();
  p.beforeResume?.();
  await resumeRestored(vm, p.connectNics);
  const resumedAt = nowMs();
  await announceRestored(vm);
  return { resumedAt, announcedAt: nowMs() };
}

/** The destination told, until it confirms or ROLLED_BACK_NOTIFY_MS pass, that the VM rolled back to `epoch` (it may wait paused for it). */
export function notifyRolledBack(o: Omit<NotifyOptions, 'outcome' | 'giveUpAfterMs'>): void {
  void notifyDestination({ ...o, outcome: 'rolled-back', giveUpAfterMs: ROLLED_BACK_NOTIFY_MS });
}

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
