/**
 * Checkpoint apply and ACK: the destination's checkpoints arrive as frames, are assembled,
 * checked against the window, written to the store in order, and acknowledged — never once a
 * decision is taken, so the destination can never release an output of an epoch after the
 * checkpoint the VM would resume from. The lease check (silence from the destination) lives
 * here too: it is what the ACK stream's peer promises.
 */
import { CheckpointAssembler } from '../../checkpoint/assembler.ts';
import type { Checkpoint } from '../../checkpoint/assembler.ts';
import type { Message } from '../../peer/messages.ts';
import { PAGE_SIZE } from '../../checkpoint/messages.ts';
import { TetherError } from '../../errors.ts';
import { ignored } from '../../util/log.ts';
import { nowMs } from '../../util/time.ts';
import { ackHoldMs } from '../faults.ts';
import { checkSourceWindow } from '../window.ts';
import type { SourceRun } from './context.ts';
import { rollback } from './rollback.ts';

/** Room for the device state (and, with a disk, what QEMU had in flight when the barrier admitted an epoch). */
const CHECKPOINT_SLACK = 64 * 1024 * 1024;

/** A checkpoint frame (BEGIN, PAGES, DISK, DISKZERO, DEVSTATE, COMMIT) from the destination. */
export function onCheckpointMessage(run: SourceRun, m: Message): void {
  if (!run.live) return;
  if (run.appliedEpoch === null) {
    void rollback(run, 'protocol', new TetherError('ERR_CKPT_SEQUENCE', 'checkpoint before checkpoint 0 was recorded'));
    return;
  }
  const vm = run.vm;
  run.assembler ??= new CheckpointAssembler({
    ramPages: vm.ramBytes / PAGE_SIZE,
    // Every page, one epoch of journaled disk writes (its bound plus what QEMU had in
    // flight when the barrier admitted it), device state.
    maxCheckpointBytes: vm.ramBytes + (vm.config.disk ? vm.config.disk.journalMaxBytes + CHECKPOINT_SLACK : 0) + CHECKPOINT_SLACK,
    expectEpoch: 1,
  });
  let ckpt: Checkpoint | null;
  try {
    // D keeps at most `window` checkpoints unacknowledged (window.ts).
    if (m.type === 'begin') checkSourceWindow(m.epoch, run.appliedEpoch, vm.config.checkpoint.window);
    ckpt = run.assembler.accept(m as never);
  } catch (e) {
    const err = e as TetherError;
    // Sent with the ABORT once this side knows it can restore: a NACK fences the destination.
    run.nack = { type: 'nack', epoch: 'epoch' in m ? m.epoch : -1, code: err.code ?? 'ERR_CKPT', message: err.message };
    void rollback(run, 'bad-checkpoint', e);
    return;
  }
  if (!ckpt) return;
  const c = ckpt;
  run.applyChain = run.applyChain.then(() => apply(run, c));
}

async function apply(run: SourceRun, ckpt: Checkpoint): Promise<void> {
  if (!run.live) return;
  const t0 = nowMs();
  try {
    await run.store.apply(ckpt);
    run.log.debug('checkpoint applied', { epoch: ckpt.epoch, pages: ckpt.pfns.length, applyMs: +(nowMs() - t0).toFixed(2) });
  } catch (e) {
    void rollback(run, 'apply-failed', e);
    return;
  }
  run.appliedEpoch = ckpt.epoch;
  const bytes = ckpt.data.length + ckpt.devstate.length + ckpt.disk.reduce((s, d) => s + (d.zero ? 0 : d.data.length), 0);
  run.ckptBytes.add(bytes);
  run.opts.metrics?.checkpointsApplied.inc();
  run.opts.metrics?.checkpointBytes.inc({}, bytes);
  // Fault injection: one hold, armed by the first checkpoint it applies to. D takes
  // checkpoints up to its window, then waits for this ACK; its guest runs on, all
  // output held. Later checkpoints wait behind this one (applies run in order).
  const wait = ackHoldMs(run.faults, ckpt.epoch, run.vm.dir, run.ackHold);
  if (wait > 0) {
    run.log.warn('fault injection: holding ACK', { epoch: ckpt.epoch, ms: Math.round(wait) });
    await run.holdAcksNap.nap(wait);
  }
  // Never ack once the rollback is decided: D must not release this epoch's outputs.
  if (!run.live) return;
  await run.channel?.send({ type: 'ack', epoch: ckpt.epoch }).catch(ignored(run.log, 'a lost ACK: the channel is closing, which decides'));
}

/** The destination's lease: silence longer than failoverTimeoutMs rolls back. */
export function checkLease(run: SourceRun): void {
  if (!run.live) return;
  const silent = nowMs() - run.lastHeard;
  if (silent > run.vm.config.checkpoint.failoverTimeoutMs) {
    void rollback(
      run,
      'lease-expired',
      new TetherError('ERR_LEASE_EXPIRED', `nothing heard from the destination for ${Math.round(silent)} ms`),
    );
  }
}
