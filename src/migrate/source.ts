/**
 * The source side of one migration, as the daemon sees it: start it, abort it, detach from
 * it, read its phase. The phases are files of their own, each readable in one sitting:
 *   source/setup.ts       reserve RAM, marker, reach the destination, `prepare` (→ prepared, or unreached/refused)
 *   source/switchover.ts  pre-copy, the stop, checkpoint 0, migrate-continue, the baseline (→ postcopy)
 *   source/apply.ts       checkpoints from the destination: assemble, apply, ACK; the lease
 *   completion/source.ts  the destination asks to own the VM: record, answer, hand over (→ completed)
 *   source/rollback.ts    resume here from the last checkpoint, or give up (→ rolled-back/failed/continued)
 *   source/restore.ts     running a restored QEMU (also the daemon's recovery)
 * Their shared state and phase machine: source/context.ts.
 */
import type { Message } from '../peer/messages.ts';
import { remoteError, TetherError } from '../errors.ts';
import { asPeerControl } from '../peer/control.ts';
import type { PeerControl } from '../peer/control.ts';
import { ignored } from '../util/log.ts';
import type { StateMachine } from '../util/state.ts';
import { nowMs, sleep } from '../util/time.ts';
import { onCompleteRequest } from './completion/source.ts';
import type { MigrationResult } from './result.ts';
import { onCheckpointMessage } from './source/apply.ts';
import { SourceRun } from './source/context.ts';
import type { SourceOptions, SourcePhase } from './source/context.ts';
import { rollback } from './source/rollback.ts';
import { refused, setup } from './source/setup.ts';
import { precopyAndSwitchover } from './source/switchover.ts';

export type { SourceOptions, SourcePhase } from './source/context.ts';
export { announceRestored, resumeRestored, waitRunning } from './source/restore.ts';

/** How long detach() waits for a decision already under way (a rollback or completion) to end. */
const DETACH_WAIT_MS = 30_000;

/**
 * The source side of one migration. Owns the decision to roll back: once
 * taken, no ACK is ever sent again, so the destination can never release an
 * output of an epoch after the checkpoint the VM resumes from.
 */
export class SourceMigration {
  readonly #run: SourceRun;

  constructor(opts: SourceOptions) {
    this.#run = new SourceRun(opts);
  }

  get phase(): StateMachine<SourcePhase> {
    return this.#run.phase;
  }

  /**
   * This migration's id (control.ts MIGRATION_ID_RE), chosen here and sent in `prepare`: every
   * answer and record about this migration names it, so none is taken for another of the VM.
   */
  get id(): string {
    return this.#run.id;
  }

  get appliedEpoch(): number | null {
    return this.#run.appliedEpoch;
  }

  /**
   * Runs the migration to its outcome. Failures become a rollback or a 'failed' result; it
   * rejects only when no tether peer was reached (refused, unreachable, failed handshake) or
   * the destination refused `prepare` (unknown VM, other device model, busy): nothing
   * changed on either host then, the VM runs here as before, and the cause is the error.
   */
  run(): Promise<MigrationResult> {
    this.#start().catch((e) => this.rollback('setup-failed', e));
    return this.#run.result.promise;
  }

  async #start(): Promise<void> {
    const uri = await setup(this.#run, (m) => this.#onMessage(m));
    if (uri !== null) await precopyAndSwitchover(this.#run, uri);
  }

  /**
   * Sidecar shutdown (SIGTERM/SIGINT): take no decision, as if the sidecar had died.
   * No ACK is sent any more (the channel closes, so D fences itself), nothing is rolled
   * back or stopped, and the migration marker stays: the restarted sidecar resolves the
   * migration from what is on disk (recovery), exactly as after SIGKILL. A checkpoint
   * being applied is finished first (not acked); a rollback or completion already under
   * way is let run to its end. run() then rejects with ERR_DAEMON_SHUTDOWN.
   */
  async detach(): Promise<void> {
    const run = this.#run;
    if (!run.live) {
      const ended = run.result.promise.then(() => undefined, ignored(run.log, 'the outcome is reported by run()'));
      await Promise.race([ended, sleep(DETACH_WAIT_MS)]);
      return;
    }
    const phase = run.phase.state;
    run.phase.to('detached');
    run.stopTimers();
    run.log.warn('sidecar shutting down mid-migration: left for recovery at the next start', { phase });
    await run.applyChain;
    run.channel?.close();
    run.result.reject(
      new TetherError('ERR_DAEMON_SHUTDOWN', `the sidecar stopped during the migration of ${run.vm.name}; its next start resolves it`),
    );
  }

  /** Operator abort (or any caller-side reason): roll back now. */
  abort(reason = 'operator-abort'): void {
    void this.rollback(reason, undefined, 0);
  }

  /**
   * Resume the VM on the source from the last applied checkpoint. `detectMs`
   * is how long the failure took to notice (defaults to the silence since the
   * destination's last message).
   */
  rollback(reason: string, err?: unknown, detectMs?: number): Promise<void> {
    return rollback(this.#run, reason, err, detectMs);
  }

  #onMessage(m: Message): void {
    const run = this.#run;
    run.lastHeard = nowMs();
    switch (m.type) {
      case 'begin':
      case 'pages':
      case 'disk':
      case 'diskzero':
      case 'devstate':
      case 'commit':
        onCheckpointMessage(run, m);
        return;
      case 'heartbeat':
        return;
      case 'control':
        this.#onControl(m.body);
        return;
      case 'abort':
        // After the decision: the destination gave up by itself (it fenced), nobody to ask any more.
        if (!run.live) run.destinationGone = true;
        // Before `ready` the destination refused `prepare`; from it on, its ABORT means roll back.
        if (run.phase.is('connecting')) void refused(run, remoteError(m.code, m.reason));
        else void this.rollback('destination-abort', remoteError(m.code, m.reason), 0);
        return;
      default:
        run.log.warn('unexpected message from destination', { type: m.type });
    }
  }

  #onControl(body: Record<string, unknown>): void {
    const run = this.#run;
    let c: PeerControl;
    try {
      c = asPeerControl(body);
    } catch (e) {
      void this.rollback('bad-control-message', e);
      return;
    }
    if (c.kind === 'epoch-stats') {
      run.pauses.add(c.pauseMs);
      run.opts.metrics?.pause.observe(c.pauseMs / 1000);
      run.lastPauseMs = c.pauseMs;
      run.tracker = c.tracker;
    } else if (c.kind === 'complete') {
      if (c.migrationId !== run.id) {
        // Only this migration's destination speaks on this channel: anything else is a protocol fault.
        const e = new TetherError('ERR_MIGRATION_ID_MISMATCH', `completion request for migration ${c.migrationId}, not ${run.id}`);
        void this.rollback('bad-control-message', e);
        return;
      }
      void onCompleteRequest(run, c.finalEpoch);
    } else if (c.kind === 'ready' && run.phase.is('connecting')) {
      run.phase.to('prepared');
    }
    run.deliverControl(c);
  }
}
