/**
 * The source half of the completion handshake (docs/completion.md; messages in protocol.ts).
 * The destination asks to own the VM (COMPLETE); recording completion durably is the commit
 * point: before it this side may still roll back, after it never. The answer (RESOLVE) goes
 * out only after the record is on stable storage, and is repeated until the destination
 * confirms it (RESOLVED), on a new channel if the migration channel is gone (notify.ts).
 */
import { ignored } from '../../util/log.ts';
import { cleanupCrashPoint, cutAfterRecord, cutBeforeRecord } from '../faults.ts';
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
  const cleanup = () =>
    run.vm
      .dropCompletedSource(cleanupCrashPoint(run.faults))
      .catch(ignored(run.log, 'records left behind are dropped again at the next start'));
  if (answer === 'pending') void confirmed.then(cleanup);
  else await cleanup();
  run.finish({ outcome: 'completed', handover: answer });
}
