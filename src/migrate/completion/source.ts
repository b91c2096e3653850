/**
 * The source half of the completion handshake (docs/completion.md; messages in protocol.ts).
 * The destination asks to own the VM (COMPLETE); recording completion durably is the commit
 * point: before it this side may still roll back, after it never. The answer (RESOLVE) goes
 * out only after the record is on stable storage, and is repeated until the destination
 * confirms it (RESOLVED), on a new channel if the migration channel is gone (notify.ts).
 */
import { ignored } from '../../util/log.ts';
import type { Logger } from '../../util/log.ts';
import type { VmInstance } from '../../vm/instance.ts';
import { cleanupCrashPoint, cutAfterRecord, cutBeforeRecord } from '../faults.ts';
import type { Faults } from '../faults.ts';
import type { SourceRun } from '../source/context.ts';
import { handOver, rollbackDecided } from '../source/rollback.ts';
import { resolveMessage } from './protocol.ts';

/** COMPLETE from the destination: record completion at `finalEpoch`, answer, hand the VM over. */
export async function onCompleteRequest(run: SourceRun, finalEpoch: number): Promise<void> {
  await run.applyChain;
  if (run.completedEpoch !== null) {
    // asked again: the answer was lost and the channel survived
    run.channel
      ?.send(resolveMessage(run.id, run.vm.name, 'completed', run.completedEpoch))
      .catch(ignored(run.log, 'a lost answer: the destination asks again, or takes it on a new channel'));
    return;
  }
  if (!run.live) return; // rolling back: the ABORT (and a resolve on a new channel) answer it
  if (cutBeforeRecord(run.faults, run.log, finalEpoch)) {
    run.channel?.close();
    return;
  }
  run.phase.to('completing', { finalEpoch });
  run.stopTimers();
  try {
    await run.store.recordCompleted(finalEpoch);
  } catch (e) {
    // Not recorded (a wrong final epoch, or I/O): the VM is still ours to resume.
    await rollbackDecided(run, 'completion-refused', e, 0);
    return;
  }
  run.completedEpoch = finalEpoch;
  // The VM is the destination's now: a standby must never run it here.
  await run.standby?.discard();
  run.phase.to('completed', { finalEpoch });
  run.vm.place = 'gone';
  cutAfterRecord(run.faults, run.log, finalEpoch, () => run.channel?.close());
  // The completion record (and the marker naming the destination) stays until the destination
  // confirmed: a restarted sidecar then answers again instead of resuming the VM here.
  const { answer, confirmed } = await handOver(run, finalEpoch);
  const dropped = dropWhenAnswered(run.vm, confirmed, run.faults, run.log);
  if (answer !== 'pending') await dropped;
  run.finish({ outcome: 'completed', handover: answer });
}

/**
 * The completed source's last step, live (onCompleteRequest) or after a sidecar restart
 * (daemon/recovery-source.ts): once the destination answered the RESOLVE (`answered`:
 * confirmed, unknown or given up), this side's records of the VM go (vm.json, marker, RAM
 * file). A failure leaves them to the next start, which answers again.
 */
export function dropWhenAnswered(vm: VmInstance, answered: Promise<unknown>, faults: Faults, log: Logger): Promise<void> {
  return answered.then(() =>
    vm.dropCompletedSource(cleanupCrashPoint(faults)).catch(ignored(log, 'records left behind are dropped again at the next start')),
  );
}
