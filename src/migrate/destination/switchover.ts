/**
 * The switchover seen from the destination: wait until QEMU runs the guest here (post-copy:
 * the source's QEMU stopped it and sent the device state), then enter `running` — from that
 * instant outputs are held (epoch 1) and the lease runs both ways (fence.ts startLease).
 */
import { TetherError, isTetherError } from '../../errors.ts';
import { queryStatus } from '../../qemu/commands.ts';
import { qmpTimeMs, type QmpTimestamp } from '../../qmp/codec.ts';
import { Nap } from '../../util/time.ts';
import type { DestContext } from './context.ts';
import { startLease } from './fence.ts';

/** Wait for the guest to run here, then start the lease. False when the migration ended first. */
export async function switchover(ctx: DestContext): Promise<boolean> {
  const qemuResumeAt = await waitRunning(ctx);
  if (ctx.stopped) return false;
  ctx.phase.to('running', qemuResumeAt === undefined ? {} : { qemuResumeAt });
  // The stream's handshake is over (the VM runs on what it carried): the key file goes.
  void ctx.tls?.removeKeys();
  startLease(ctx);
  return true;
}

/**
 * Until QEMU runs the guest here: polls query-status, woken at once by the RESUME event.
 * Returns QEMU's own time of that RESUME (QMP timestamp), the end of the switchover
 * blackout, when the event was seen.
 *
 * QEMU 7.2 runs the incoming TLS handshake on a blocking socket in its main loop: a
 * client that connects to the port and then stays silent freezes this QEMU (QMP too)
 * until it goes away, and the source's QEMU with it once it connects. Measured: QMP
 * unanswered for as long as such a connection stays open. So a QMP silence of
 * fenceTimeoutMs before the VM runs here is ERR_INCOMING_STALLED: this side aborts
 * and fences (kills its QEMU, which also frees the source's QEMU from its handshake),
 * and the source, which still runs the VM, rolls back. (A connection that sends
 * anything but the key's handshake is refused by QEMU at once; the port stays open.)
 */
async function waitRunning(ctx: DestContext): Promise<number | undefined> {
  const qmp = ctx.vm.qemu!.qmp;
  const stallMs = ctx.vm.config.checkpoint.fenceTimeoutMs;
  let resumedAt: number | undefined;
  const nap = new Nap();
  const onEvent = (name: string, _d: unknown, ts: QmpTimestamp | undefined) => {
    if (name !== 'RESUME') return;
    if (resumedAt === undefined && ts) resumedAt = qmpTimeMs(ts);
    nap.wake();
  };
  qmp.on('event', onEvent);
  try {
    while (!ctx.stopped) {
      const s = await queryStatus(qmp, { timeoutMs: stallMs }).catch((e: unknown) => {
        throw isTetherError(e, 'ERR_QMP_TIMEOUT') && !ctx.stopped
          ? new TetherError('ERR_INCOMING_STALLED', `the incoming QEMU did not answer QMP for ${stallMs} ms before the switchover`)
          : e;
      });
      if (s.status === 'running') return resumedAt;
      await nap.nap(10);
    }
    return undefined;
  } finally {
    qmp.off('event', onEvent);
  }
}
