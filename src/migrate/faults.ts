import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { TetherError } from '../errors.ts';
import type { Logger } from '../util/log.ts';
import { nowMs, sleep } from '../util/time.ts';
import { CUT_COMPLETION } from './completion/protocol.ts';

/**
 * Fault injection for the netns harness and demos, from the daemon's
 * environment: TETHER_FAULTS="corrupt-epoch=5,delay-first-checkpoint-ms=60000".
 * Unknown names are refused so that a typo cannot silently test nothing.
 *   delay-first-checkpoint-ms=N  the destination waits N ms before checkpoint 1
 *   corrupt-epoch=K              the destination flips one byte inside checkpoint K's DEVSTATE frame
 *   truncate-epoch=K             the destination sends checkpoint K up to half of its DEVSTATE frame, then drops the channel
 *   fail-apply-epoch=K           the source's page writes of the first checkpoint >= K that has pages fail
 *                                (EIO) halfway, once: the rollback must finish the persisted stage before resuming
 *   fail-apply-sticky=K          the same on every attempt: the rollback cannot finish it; the source gives the
 *                                rollback up and the VM continues on the (reachable) destination (exit 5)
 *   cut-completion=N             cut the channel at step N of the completion handshake (CUT_COMPLETION; set it on the
 *                                side that acts at that step)
 *   hold-acks-ms=N               the source holds back ACKs for N ms from the first checkpoint >= hold-acks-epoch
 *                                it applies (heartbeats go on; keep N below failoverTimeoutMs or the destination fences);
 *                                the destination takes up to checkpoint.window checkpoints, then waits, outputs held
 *                                (a decision of the source, e.g. a rollback, ends the hold at once)
 *   hold-acks-epoch=K            first checkpoint whose ACK hold-acks-ms holds (default 3)
 *   hold-acks-trigger            the hold arms only once the file <stateDir>/<vm>/hold-acks.trigger exists (a test
 *                                creates it when the destination's guest has shown it runs), at the next checkpoint
 *   hold-completion              the destination keeps taking checkpoints after QEMU's stream completed and does not
 *                                ask the source to complete until the file <stateDir>/<vm>/hold-completion.release
 *                                exists: a test's interruption point cannot come after the migration ended, however
 *                                fast the machine (the test creates the file when it wants the migration to complete)
 *   crash-before-resume          the source's sidecar dies (SIGKILL of itself) in a rollback past switchover once the
 *                                restored QEMU exists (recorded, loading or paused), before its NICs and `cont`
 *   crash-cleanup-step=N         after a confirmed completion, the sidecar dies (SIGKILL of itself) right after step N
 *                                of dropping its records (VmInstance.dropCompletedSource on the source: 1 vm.json,
 *                                2 marker, 3 checkpoints and RAM; dropCompletingRecords on the destination: 1 marker,
 *                                2 completion request)
 *   relay-pause-ms=N             the destination's relays stop reading QEMU's out socket for N ms, once, from their first
 *                                read after checkpoint relay-pause-epoch was sealed (a wedged sidecar; QEMU writes on
 *                                into its socket's send buffer, which the relay raised to the gate's byte bound)
 *   relay-pause-epoch=K          the checkpoint after whose seal relay-pause-ms pauses (default 5)
 *   relay-pause-bytes=B          end the pause early once more than B bytes wait in the out socket (relay-pause-ms is
 *                                then the longest it lasts): a test reaches its queue depth by construction
 *   relay-sndbuf-default         control: the destination's relays leave QEMU's out-socket send buffer at the kernel
 *                                default (a relay that does not read then blocks QEMU once that is full)
 *   gate-open                    the destination's packet gates pass frames through instead of holding them
 *                                (control tests: output commit switched off must be observed as a violation)
 *   journal-write-through        the destination's block-write journal writes through to the shared image (control tests)
 *   hold-writeback               at completion the destination waits until its journal holds at least two extents
 *                                (the guest keeps writing), and its write-back into the image then stops for good
 *                                after the first extent; once the completion records are dropped it logs
 *                                'fault injection: write-back held' (a test kills the sidecar there: its restart
 *                                must finish the write-back from the log's completed record)
 *   hold-writeback-early         the same hold, but logged (and kept) before the completion records are dropped:
 *                                'fault injection: write-back held, completion records kept'
 *   slow-scan-ms=N               the destination's dirty-page scan of checkpoint slow-scan-epoch sleeps N ms inside the
 *                                native scan job, on the worker thread the scan runs on (a barrier longer than the lease)
 *   slow-scan-epoch=K            the checkpoint whose scan slow-scan-ms slows down (default 1)
 *   fail-restore-load            the source's standby QEMUs are handed a device-state file that is no migration
 *                                stream, so their load fails in QEMU: the rollback cannot prove it can restore
 *                                (with the destination reachable, the VM continues there)
 *   hold-migrate-trigger         the source sets up the stream's credentials, then waits to send QMP `migrate` until
 *                                the file <stateDir>/<vm>/migrate.trigger exists (a test connects to the destination's
 *                                port first)
 *   plain-stream                 this side's QEMU migration stream goes without TLS (control tests and the benchmark's
 *                                plain column; set on both sides, or D's QEMU refuses S's stream)
 */
export interface Faults {
  delayFirstCheckpointMs?: number;
  corruptEpoch?: number;
  truncateEpoch?: number;
  cutCompletion?: number;
  holdAcksMs?: number;
  holdAcksEpoch?: number;
  holdAcksTrigger?: boolean;
  holdCompletion?: boolean;
  gateOpen?: boolean;
  failApplyEpoch?: number;
  failApplySticky?: number;
  journalWriteThrough?: boolean;
  holdWriteback?: boolean;
  holdWritebackEarly?: boolean;
  crashCleanupStep?: number;
  crashBeforeResume?: boolean;
  slowScanMs?: number;
  slowScanEpoch?: number;
  relayPauseMs?: number;
  relayPauseEpoch?: number;
  relayPauseBytes?: number;
  relaySndbufDefault?: boolean;
  failRestoreLoad?: boolean;
  plainStream?: boolean;
  holdMigrateTrigger?: boolean;
}

/** Steps of the completion handshake at which cut-completion=N drops the channel: defined with the handshake. */
export { CUT_COMPLETION };

/** File name, in the VM's state dir, that lets a source held by hold-migrate-trigger send `migrate`. */
export const MIGRATE_TRIGGER = 'migrate.trigger';

/** File name, in the VM's state dir, that arms hold-acks-trigger. */
export const HOLD_ACKS_TRIGGER = 'hold-acks.trigger';

/** File name, in the VM's state dir on the destination, that releases hold-completion. */
export const HOLD_COMPLETION_RELEASE = 'hold-completion.release';

type Flag =
  | 'gateOpen'
  | 'journalWriteThrough'
  | 'holdWriteback'
  | 'holdWritebackEarly'
  | 'holdAcksTrigger'
  | 'holdCompletion'
  | 'crashBeforeResume'
  | 'failRestoreLoad'
  | 'plainStream'
  | 'holdMigrateTrigger'
  | 'relaySndbufDefault';

/** Switches without a value. */
const FLAGS: Record<string, Flag> = {
  'gate-open': 'gateOpen',
  'journal-write-through': 'journalWriteThrough',
  'hold-writeback': 'holdWriteback',
  'hold-writeback-early': 'holdWritebackEarly',
  'hold-acks-trigger': 'holdAcksTrigger',
  'hold-completion': 'holdCompletion',
  'crash-before-resume': 'crashBeforeResume',
  'fail-restore-load': 'failRestoreLoad',
  'plain-stream': 'plainStream',
  'hold-migrate-trigger': 'holdMigrateTrigger',
  'relay-sndbuf-default': 'relaySndbufDefault',
};

const NAMES: Record<string, Exclude<keyof Faults, Flag>> = {
  'delay-first-checkpoint-ms': 'delayFirstCheckpointMs',
  'corrupt-epoch': 'corruptEpoch',
  'truncate-epoch': 'truncateEpoch',
  'cut-completion': 'cutCompletion',
  'hold-acks-ms': 'holdAcksMs',
  'hold-acks-epoch': 'holdAcksEpoch',
  'fail-apply-epoch': 'failApplyEpoch',
  'fail-apply-sticky': 'failApplySticky',
  'crash-cleanup-step': 'crashCleanupStep',
  'slow-scan-ms': 'slowScanMs',
  'slow-scan-epoch': 'slowScanEpoch',
  'relay-pause-ms': 'relayPauseMs',
  'relay-pause-epoch': 'relayPauseEpoch',
  'relay-pause-bytes': 'relayPauseBytes',
};

/** crash-before-resume: the rollback's restored QEMU exists (recorded in vm.json), not yet resumed. */
export function crashBeforeResume(faults: Faults | undefined, log: { warn(msg: string): void }): void {
  if (!faults?.crashBeforeResume) return;
  log.warn('fault injection: sidecar dies with the restored QEMU not yet resumed');
  process.kill(process.pid, 'SIGKILL');
}

/** The `afterStep` hook of the post-completion clean-up (crash-cleanup-step=N). */
export function cleanupCrashPoint(faults: Faults): (step: number) => void {
  return (step) => {
    if (faults.crashCleanupStep === step) process.kill(process.pid, 'SIGKILL');
  };
}

/**
 * hold-acks-ms: how long the ACK of checkpoint `epoch` still waits (0: not held). One hold,
 * armed by the first checkpoint it applies to (recorded in `hold.until`); with
 * hold-acks-trigger only once the trigger file exists.
 */
export function ackHoldMs(f: Faults, epoch: number, vmDir: string, hold: { until?: number }): number {
  if (!f.holdAcksMs || epoch < (f.holdAcksEpoch ?? 3)) return 0;
  if (hold.until === undefined && f.holdAcksTrigger && !existsSync(path.join(vmDir, HOLD_ACKS_TRIGGER))) return 0;
  hold.until ??= nowMs() + f.holdAcksMs;
  return hold.until - nowMs();
}

/** hold-migrate-trigger: waits, while `live()`, for the trigger file that lets the source send `migrate`. */
export async function holdMigrateTrigger(f: Faults, vmDir: string, log: Logger, live: () => boolean): Promise<void> {
  if (!f.holdMigrateTrigger) return;
  log.warn('fault injection: migrate waits for its trigger file');
  while (live() && !existsSync(path.join(vmDir, MIGRATE_TRIGGER))) await sleep(50);
}

/** fail-restore-load: the device-state file a standby is handed, one QEMU refuses ("not a migration stream"). */
export async function restoreLoadPath(f: Faults, devstatePath: string): Promise<string> {
  if (!f.failRestoreLoad) return devstatePath;
  const fault = `${devstatePath}.fault`;
  await fs.writeFile(fault, 'fault injection: not a migration stream\n');
  return fault;
}

/** cut-completion=2 on the source: true (logged) when the request is to be dropped with the channel, unrecorded. */
export function cutBeforeRecord(f: Faults, log: Logger, finalEpoch: number): boolean {
  if (f.cutCompletion !== CUT_COMPLETION.beforeRecord) return false;
  log.warn('fault injection: dropping the channel before recording completion', { finalEpoch });
  return true;
}

/** cut-completion=3/4 on the source, once completion is recorded: drop the channel (`close`), or die. */
export function cutAfterRecord(f: Faults, log: Logger, finalEpoch: number, close: () => void): void {
  if (f.cutCompletion === CUT_COMPLETION.afterRecord) {
    log.warn('fault injection: dropping the channel after recording completion', { finalEpoch });
    close();
  } else if (f.cutCompletion === CUT_COMPLETION.crashAfterRecord) {
    log.warn('fault injection: sidecar dies after recording completion', { finalEpoch });
    process.kill(process.pid, 'SIGKILL');
  }
}

export function parseFaults(spec: string | undefined): Faults {
  const out: Faults = {};
  if (!spec) return out;
  for (const part of spec
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)) {
    const [name, value] = part.split('=');
    const flag = FLAGS[name ?? ''];
    if (flag && value === undefined) {
      out[flag] = true;
      continue;
    }
    const key = NAMES[name ?? ''];
    const n = Number(value);
    if (!key || !Number.isInteger(n) || n < 0) {
      throw new TetherError(
        'ERR_FAULTS_INVALID',
        `TETHER_FAULTS: cannot parse '${part}' (known: ${[...Object.keys(NAMES), ...Object.keys(FLAGS)].join(', ')})`,
      );
    }
    out[key] = n;
  }
  return out;
}
