/**
 * The rollback: resume the VM on the source from the last applied checkpoint. Before
 * switchover that is cancelling the pre-copy; past it, restore before fence (docs/design.md):
 * prove this side can restore (the checkpoint whole, a standby loaded) while the destination
 * holds, only then fence it and run the restored QEMU. When it cannot be proven and the
 * destination still runs the VM, the rollback is given up and the VM continues there.
 */
import fs from 'node:fs/promises';
import type { AppliedCheckpoint } from '../../checkpoint/store.ts';
import { TetherError } from '../../errors.ts';
import { cont, MIGRATION_ACTIVE, migrateCancel, queryMigrate, queryStatus } from '../../qemu/commands.ts';
import { errorFields, ignored } from '../../util/log.ts';
import type { Logger } from '../../util/log.ts';
import { nowMs, sleep } from '../../util/time.ts';
import { notifyDestination } from '../completion/notify.ts';
import { crashBeforeResume, restoreLoadPath } from '../faults.ts';
import { round } from '../result.ts';
import type { RollbackFigures } from '../result.ts';
import { HotStandby, untilCannotRun } from '../standby.ts';
import type { StreamTls } from '../stream-tls.ts';
import type { VmInstance } from '../../vm/instance.ts';
import { HEARTBEAT_MS } from './context.ts';
import type { SourceRun } from './context.ts';
import { notifyRolledBack, runRestored, wholeCheckpoint } from './restore.ts';

export { announceRestored, resumeRestored, waitRunning, waitStatus } from './restore.ts';

/**
 * Rollback reasons after which the destination cannot be asked anything: it ended the
 * migration itself (its ABORT: it fenced), the channel is gone, or it went silent. Restoring
 * here is then the only option, whether or not it can be proven first.
 */
const DESTINATION_GONE = new Set(['destination-abort', 'peer-channel-closed', 'lease-expired']);

/**
 * Roll back now, unless a decision is already taken. `detectMs` is how long the failure took
 * to notice (defaults to the silence since the destination's last message).
 */
export async function rollback(run: SourceRun, reason: string, err?: unknown, detectMs?: number): Promise<void> {
  if (!run.live) return;
  await rollbackDecided(run, reason, err, detectMs);
}

/** The rollback, from a live phase or from `completing` (a completion that could not be recorded). */
export async function rollbackDecided(run: SourceRun, reason: string, err?: unknown, detectMs?: number): Promise<void> {
  const tDecide = nowMs();
  const detect = detectMs ?? tDecide - run.lastHeard;
  run.stopTimers();
  const vm = run.vm;
  run.log.warn('rolling back', { reason, ...(err ? { error: errorFields(err) } : {}) });
  run.phase.to('rolling-back', { reason });
  vm.place = 'rolling-back';
  run.progress({ phase: 'rolling-back', reason });
  run.releaseWaiters();
  if (DESTINATION_GONE.has(reason)) run.destinationGone = true;
  await holdOrFence(run, reason);

  const figures: RollbackFigures = { reason, epoch: null, detectMs: round(detect), restoreMs: 0, killMs: 0, startMs: 0, announceMs: 0 };
  try {
    let tRestored: number | null = null;
    if (!run.continued) {
      // Before switchover the source QEMU still owns the VM: cancel and carry on.
      await cancelPrecopy(vm, run.log, { tls: run.tls });
    } else {
      const restored = await restorePastSwitchover(run, reason, figures);
      if (restored === 'gave-up') return;
      tRestored = restored;
    }
    figures.restoreMs = round((tRestored ?? nowMs()) - tDecide);
    vm.place = 'running';
    run.phase.to('rolled-back', { epoch: figures.epoch, restoreMs: figures.restoreMs });
    if (run.continued) {
      // A destination that asked to complete waits, paused, for an answer: if the ABORT
      // did not reach it, tell it on a new channel (it answers known=false if it fenced).
      notifyRolledBack({
        psk: run.opts.host.peer.key,
        to: run.opts.to,
        migrationId: run.id,
        vm: vm.name,
        epoch: figures.epoch ?? 0,
        log: run.log,
      });
    }
    run.finish({ outcome: 'rolled-back', reason, err, rollback: figures });
  } catch (e) {
    run.log.error('rollback failed: the VM is not running', { error: errorFields(e) });
    await fenceDestination(run, reason);
    // never leave the wedged source QEMU (or a half-restored one) behind a 'failed'
    await vm.killQemu().catch(ignored(run.log, 'the wedged QEMU may be gone already'));
    vm.place = 'stopped';
    run.phase.to('failed');
    run.finish({ outcome: 'failed', reason, err: e, rollback: figures });
  }
}

/**
 * Restore before fence (docs/design.md): past switchover, a destination this side can reach is
 * told to hold — keep its VM, hold every output, fence on nothing but this side's word — and
 * kept alive by heartbeats while this side proves it can restore. Before switchover it is
 * fenced at once.
 */
async function holdOrFence(run: SourceRun, reason: string): Promise<void> {
  const ch = run.channel;
  if (run.continued && !run.destinationGone && ch && !ch.closed) {
    await ch
      .send({ type: 'control', body: { kind: 'hold', migrationId: run.id } })
      .catch(ignored(run.log, 'a lost HOLD: the destination then fences on its lease, as if gone'));
    run.every(HEARTBEAT_MS, () => {
      if (!ch.closed && !run.fenced) run.heartbeat(ch);
    });
  } else if (!run.continued) {
    await fenceDestination(run, reason);
  }
}

/**
 * Past switchover: prove, fence, kill the old QEMU, run the restored one (the loaded standby,
 * or a fresh QEMU from the device state) and announce it. Returns when the VM was announced,
 * or 'gave-up' when the rollback was given up (the VM continues on the destination).
 */
async function restorePastSwitchover(run: SourceRun, reason: string, figures: RollbackFigures): Promise<number | 'gave-up'> {
  const vm = run.vm;
  const ch = run.channel;
  let last: AppliedCheckpoint;
  try {
    const proof = await proveRestorable(run);
    last = proof.last;
    // No standby could load it: with the destination gone, the cold path (a fresh QEMU
    // after the kill) is still worth its try; with it reachable, that is no proof.
    if (proof.standbyError !== undefined && !run.destinationGone && ch && !ch.closed) throw proof.standbyError;
  } catch (e) {
    if (run.destinationGone || !ch || ch.closed) throw e;
    // It cannot be restored here, and the destination still runs the VM, all outputs
    // held: give the rollback up instead of losing the VM on both hosts.
    await giveUp(run, reason, e);
    return 'gave-up';
  }
  figures.epoch = last.epoch;
  // Only now: the destination stops its VM and drops what it holds.
  await fenceDestination(run, reason);
  const t1 = nowMs();
  run.opts.nics?.suspend();
  const exited = vm.killQemu();
  const loaded = run.standby?.loaded ?? false;
  // A loaded standby may take over while the old QEMU's teardown finishes, once that can no longer run.
  await (loaded ? untilCannotRun(vm.qemu, exited) : exited);
  const t2 = nowMs();
  figures.hot = loaded;
  const { resumedAt: t3, announcedAt: t4 } = await runRestored(vm, {
    load: loaded ? () => run.standby!.takeOver() : () => exited.then(() => vm.restoreFrom(last.devstatePath)),
    beforeResume: () => crashBeforeResume(run.faults, run.log),
    connectNics: () => run.opts.nics?.resume(),
  });
  await exited; // the old QEMU's teardown may outlast the restore; not counted in it
  figures.killMs = round(t2 - t1);
  figures.startMs = round(t3 - t2);
  figures.announceMs = round(t4 - t3);
  return t4;
}

/**
 * Everything that can show, while the destination may still run the VM, that this side can
 * resume it: applies settle (the one under way completes, unacked), a half-applied checkpoint
 * is finished from its stage, the applied record and its device-state file verify from disk,
 * and — with the hot standby — a standby QEMU has loaded that device state and waits paused
 * (a fresh one is started if the first is gone). Throws ERR_CKPT_HALF_APPLIED or
 * ERR_CKPT_*_CORRUPT when the checkpoint is not whole; returns the standby's failure
 * (ERR_RESTORE_UNAVAILABLE) as `standbyError`.
 */
async function proveRestorable(run: SourceRun): Promise<{ last: AppliedCheckpoint; standbyError?: unknown }> {
  await run.applyChain; // an apply under way completes (but is not acked)
  // A failed apply may have left part of its checkpoint in the RAM file: finish it from
  // the persisted stage, or fail (ERR_CKPT_HALF_APPLIED) rather than resume mixed state.
  const last = await wholeCheckpoint(run.store);
  if (!run.vm.config.migration.hotStandby) return { last }; // the cold path starts its QEMU after the kill
  const sb = run.standby;
  const devstate = await restoreLoadPath(run.faults, last.devstatePath);
  try {
    if (!sb) throw new TetherError('ERR_RESTORE_UNAVAILABLE', 'no hot standby was started');
    await sb.load(devstate);
  } catch (e) {
    run.log.warn('hot standby unusable: starting another one to load the device state', { error: errorFields(e) });
    await sb?.discard();
    run.standby = HotStandby.start(run.vm);
    try {
      await run.standby.load(devstate);
    } catch (e2) {
      return { last, standbyError: e2 };
    }
  }
  return { last };
}

/** Tell the destination to fence (NACK first if a checkpoint was bad, then ABORT) and close. Idempotent. */
export async function fenceDestination(run: SourceRun, reason: string): Promise<void> {
  if (run.fenced) return;
  run.fenced = true;
  run.stopTimers();
  const ch = run.channel;
  if (ch && !ch.closed) {
    const lost = ignored(run.log, 'a lost ABORT: the channel closes next, and the destination fences on that');
    if (run.nack) await Promise.race([ch.send(run.nack).catch(lost), sleep(200)]);
    await Promise.race([ch.send({ type: 'abort', code: 'ERR_ROLLBACK', reason }).catch(lost), sleep(200)]);
    ch.close();
  }
}

/**
 * The rollback cannot be carried out here (`cause`) while the destination runs the VM, all
 * its outputs held: the VM stays there. The destination still pulls pages from this side's
 * QEMU, so this waits until the post-copy stream has sent everything; then records durably
 * that it never resumes the VM (completed.json at the last applied epoch: the commit point of
 * docs/completion.md, which a restarted sidecar honours) and only then tells the destination,
 * which releases its outputs and goes on. Throws (the caller fences and reports failed) when
 * the stream cannot finish or the record cannot be written.
 */
async function giveUp(run: SourceRun, reason: string, cause: unknown): Promise<void> {
  const vm = run.vm;
  run.log.error('cannot restore here while the destination runs the VM: giving the rollback up', { error: errorFields(cause) });
  await run.standby?.discard();
  await waitStreamSent(run);
  const epoch = await run.store.recordGaveUp();
  run.completedEpoch = epoch;
  run.fenced = true; // never ABORT from here on
  run.phase.to('continued-on-destination', { epoch, code: (cause as TetherError).code });
  vm.place = 'gone';
  const answer = await handOver(run, epoch);
  const cleanup = async () => {
    await vm.removeRam().catch(ignored(run.log, 'RAM of a VM that runs elsewhere; removed again at the next start'));
    await vm.forget().catch(ignored(run.log, 'vm.json of a VM that runs elsewhere; resolved at the next start'));
    await vm.setMigrationMarker(null).catch(ignored(run.log, 'a marker left behind is resolved at the next start'));
  };
  if (answer.answer === 'pending') void answer.confirmed.then(cleanup);
  else await cleanup();
  run.finish({ outcome: 'continued-on-destination', reason, err: cause, handover: answer.answer });
}

/**
 * The VM is the destination's (completion recorded at `epoch`): tell it, waiting up to the
 * failover timeout for its confirmation, then close the channel and drop this side's QEMU and
 * RAM. `confirmed` goes on past the wait ('pending'). Shared by a completion and a given-up rollback.
 */
export async function handOver(
  run: SourceRun,
  epoch: number,
): Promise<{ answer: 'confirmed' | 'unknown' | 'gave-up' | 'pending'; confirmed: Promise<'confirmed' | 'unknown' | 'gave-up'> }> {
  const vm = run.vm;
  const confirmed = notifyDestination({
    psk: run.opts.host.peer.key,
    to: run.opts.to,
    migrationId: run.id,
    vm: vm.name,
    outcome: 'completed',
    epoch,
    log: run.log,
    ...(run.channel ? { channel: run.channel } : {}),
  });
  // The outcome is decided; `tether migrate` waits a little for the hand-over to be confirmed.
  const answer = await Promise.race([confirmed, sleep(vm.config.checkpoint.failoverTimeoutMs).then(() => 'pending' as const)]);
  run.stopTimers();
  run.channel?.close();
  // The VM lives on the destination now; the source's copy is dropped.
  await vm.stopQemu().catch(ignored(run.log, 'a QEMU that exits by itself at the end of its stream'));
  await fs.rm(vm.ramFile, { force: true }).catch(ignored(run.log, 'the RAM file goes with the records at clean-up'));
  return { answer, confirmed };
}

/** Until this side's QEMU has sent the destination every page (query-migrate 'completed'). */
async function waitStreamSent(run: SourceRun): Promise<void> {
  const q = run.vm.qemu;
  for (;;) {
    if (!q || q.hasExited) throw new TetherError('ERR_SOURCE_QEMU_EXITED', 'source QEMU exited before the destination had every page');
    const m = await queryMigrate(q.qmp);
    if (m.status === 'completed') return;
    if (m.status === 'failed' || m.status === 'cancelled' || m.status === 'postcopy-paused') {
      throw new TetherError('ERR_QEMU_MIGRATION_FAILED', `source QEMU migration ${m.status} before the destination had every page`);
    }
    await sleep(20);
  }
}

/** Polls of query-migrate, 20 ms apart, while a cancelled pre-copy winds down. */
const CANCEL_POLLS = 500;

/**
 * Before switchover: cancel QEMU's migration, wait until it has ended (at most CANCEL_POLLS
 * polls), let the VM run on here and remove the stream's TLS credentials (`tls`). One step for
 * the live rollback and a restarted sidecar's recovery of an adopted pre-switchover QEMU; the
 * latter has no StreamTls of the dead sidecar (the next migration's set-up deletes a leftover
 * object first) and bounds every command by `qmpTimeoutMs` (an adopted QEMU may be wedged).
 */
export async function cancelPrecopy(vm: VmInstance, log: Logger, opts: { tls?: StreamTls; qmpTimeoutMs?: number } = {}): Promise<void> {
  const q = vm.qemu;
  if (!q || q.hasExited) throw new TetherError('ERR_SOURCE_QEMU_EXITED', 'source QEMU is gone before switchover');
  const bound = opts.qmpTimeoutMs === undefined ? undefined : { timeoutMs: opts.qmpTimeoutMs };
  await migrateCancel(q.qmp, bound).catch(ignored(log, 'no migration to cancel (it never started, or ended)'));
  for (let i = 0; i < CANCEL_POLLS; i++) {
    const st = await queryMigrate(q.qmp, bound);
    if (!MIGRATION_ACTIVE.includes(st.status ?? '')) break;
    await sleep(20);
  }
  if ((await queryStatus(q.qmp, bound)).status !== 'running') await cont(q.qmp, bound);
  // This QEMU goes on running the VM: the next migration adds credentials of its own.
  await opts.tls?.tearDown();
}
