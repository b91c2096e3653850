/**
 * The destination's half of the completion handshake (docs/completion.md): ask the source to
 * complete once every checkpoint is acknowledged (`complete`), pause on silence instead of
 * fencing while the answer is awaited, and act on the answer (`resolve`): completed — cont,
 * release the held outputs, write the journal back, drop the records, close the disk window;
 * rolled-back — fence (the caller does: ../destination/fence.ts). A source `hold` (it decided
 * to roll back and checks it can restore) is handled here too: it ends the same two ways.
 * The steps a sidecar restarted inside the handshake takes as well (daemon recovery,
 * src/daemon/recovery-destination.ts) are functions of the VM, its journal and a logger, not
 * of the live DestContext: decideAnswer, stopForAnswer, runHere, closeDiskWindow.
 */
import { existsSync } from 'node:fs';
import path from 'node:path';
import { writeCompletingRecord } from '../../checkpoint/store.ts';
import type { BlockJournal } from '../../disk/journal.ts';
import type { EpochOutputs } from '../../epoch/outputs.ts';
import { TetherError } from '../../errors.ts';
import { cont, stop } from '../../qemu/commands.ts';
import type { QmpExecuteOptions } from '../../qmp/client.ts';
import { errorFields, ignored } from '../../util/log.ts';
import type { Logger } from '../../util/log.ts';
import { nowMs, sleep } from '../../util/time.ts';
import type { VmInstance } from '../../vm/instance.ts';
import { cleanupCrashPoint, CUT_COMPLETION, HOLD_COMPLETION_RELEASE } from '../faults.ts';
import type { DestContext } from '../destination/context.ts';

/** Where the destination records that it asked to complete (see writeCompletingRecord). */
export const completingRecordPath = (vm: VmInstance): string => path.join(vm.dir, 'completing.json');

/** The destination's reply to a resolve: RESOLVED's `known` and, when refused, why. */
import { resolvedMessage, type ResolveAnswer, type ResolveRefusal } from './protocol.ts';
export type { ResolveAnswer, ResolveRefusal };

/** The source's answer (`resolve`), as the destination reads it. */
export interface Resolve {
  migrationId: string;
  outcome: 'completed' | 'rolled-back';
  epoch: number;
}

/**
 * The refusal of a resolve that names another migration than `current` (the one this host
 * holds for the VM; null: none): a stale answer, retried for minutes, to an earlier migration
 * of the same VM. Null when the ids match. Shared by the running destination and by a sidecar
 * restarted during the completion handshake.
 */
export function staleResolve(current: string | null, asked: string): ResolveRefusal | null {
  if (current === asked) return null;
  return {
    known: false,
    code: 'ERR_MIGRATION_ID_MISMATCH',
    message: `the answer is for migration ${asked}; this host holds ${current ?? 'none'} of the VM`,
  };
}

/** What to do on a resolve: the RESOLVED answer, and whether the answer fences or completes this side. */
export interface ResolveDecision {
  answer: ResolveAnswer;
  act?: 'fence' | 'finish';
}

/** What a resolve is decided on: this host's side of the migration (see DestContext). */
export interface AnswerState {
  /** The migration this host holds for the VM. */
  id: string;
  /** The final epoch this side asked the source to complete; null: none asked. */
  finalEpoch: number | null;
  /** The source's `completed` was acted on already (phase completed). */
  completed: boolean;
  /** The source holds the migration (DestContext.held). */
  held: boolean;
  /** The migration has ended here (DestContext.stopped). */
  stopped: boolean;
}

/**
 * The source's answer to this side's completion request (on the migration channel or on a
 * new one). known=false when it does not match this migration: above all when it names
 * another migration id (a retried answer to an earlier migration of this VM), which is
 * logged, counted (`onStale`) and never acted on: it must not fence or complete this one.
 * Decided alike by the live destination (decideResolve) and by a sidecar restarted inside
 * the handshake (daemon recovery: never held, never completed while it waits).
 */
export function decideAnswer(s: AnswerState, c: Resolve, log: Logger, onStale?: () => void): ResolveDecision {
  const { outcome, epoch } = c;
  const stale = staleResolve(s.id, c.migrationId);
  if (stale) {
    log.warn('ignored an answer for another migration of this VM', { code: stale.code, answerFor: c.migrationId, outcome, epoch });
    onStale?.();
    return { answer: stale };
  }
  const unknown = (message: string): ResolveDecision => ({ answer: { known: false, code: 'ERR_NO_MIGRATION', message } });
  if (outcome === 'rolled-back') {
    if (s.completed) {
      log.error('source says rolled back after it answered completed: ignored', { epoch });
      return unknown('completed already');
    }
    return { answer: { known: true }, act: 'fence' };
  }
  if (s.completed) return s.finalEpoch === epoch || s.held ? { answer: { known: true } } : unknown('completed with another final epoch');
  if (s.held && !s.stopped) {
    // The source gave up a rollback it could not carry out, recorded durably (its completed.json
    // at its last applied epoch): it never resumes the VM, which continues here.
    log.warn('the source could not restore and gave the rollback up: the VM continues here', { epoch });
    return { answer: { known: true }, act: 'finish' };
  }
  if (s.finalEpoch === null || s.finalEpoch !== epoch || s.stopped) {
    log.error('completion answer does not match this migration', { epoch, completing: s.finalEpoch });
    return unknown('no completion request of that final epoch');
  }
  return { answer: { known: true }, act: 'finish' };
}

/** decideAnswer on the live destination's state. */
export function decideResolve(ctx: DestContext, c: Resolve): ResolveDecision {
  const s = { id: ctx.id, finalEpoch: ctx.finalEpoch, completed: ctx.phase.is('completed'), held: ctx.held, stopped: ctx.stopped };
  return decideAnswer(s, c, ctx.log, ctx.opts.onStaleResolve);
}

/**
 * Fault injection on the source's answer as it arrives on the migration channel:
 * cut-completion=crashOnAnswer kills this sidecar, cut-completion=answer drops the first
 * answer and the channel. True when the answer is dropped (not to be acted on).
 */
export function answerFault(ctx: DestContext, c: Resolve): boolean {
  if (ctx.faults.cutCompletion === CUT_COMPLETION.crashOnAnswer) {
    ctx.log.warn('fault injection: sidecar dies on the source answer, before acting on it');
    process.kill(process.pid, 'SIGKILL');
  }
  if (ctx.faults.cutCompletion === CUT_COMPLETION.answer && !ctx.answerDropped) {
    ctx.answerDropped = true;
    ctx.log.warn('fault injection: dropping the source answer and the channel', { outcome: c.outcome });
    ctx.ch.close();
    return true;
  }
  return false;
}

/** RESOLVED: this side's confirmation of the source's answer (known=false: refused, with why). */
export function sendResolved(ctx: DestContext, c: Resolve, a: ResolveAnswer): void {
  ctx.ch
    .send(resolvedMessage(c.migrationId, a))
    .catch(ignored(ctx.log, 'the channel may be closed: the source re-sends its answer until confirmed'));
}

/** The source decided to roll back and first checks it can restore: see DestContext.held. */
export function onHold(ctx: DestContext, migrationId: string): void {
  if (migrationId !== ctx.id || ctx.stopped) {
    ctx.log.warn('ignored a hold for another migration', { holdFor: migrationId });
    return;
  }
  ctx.held = true;
  ctx.log.warn('the source holds this migration (it decided to roll back and checks it can restore): outputs held');
  // The source may give the rollback up and leave the VM here: this sidecar's death must
  // freeze this QEMU, not destroy it.
  ctx.guard?.pauseOnly();
}

/** Silence or a lost channel during the handshake: stop the guest, keep QEMU and its RAM. */
export async function pauseForAnswer(ctx: DestContext, reason: string): Promise<void> {
  if (ctx.pausedForAnswer || ctx.stopped) return;
  ctx.pausedForAnswer = true;
  ctx.log.warn('no answer to the completion request yet: guest paused, outputs held', { reason, finalEpoch: ctx.finalEpoch });
  await stopForAnswer(ctx.vm, ctx.outputs).catch((e: unknown) => ctx.log.warn('pausing the guest failed', { error: errorFields(e) }));
}

/**
 * Stop the guest while the source's answer is awaited, its QEMU and RAM kept: the live
 * destination's pause (pauseForAnswer) and a restarted sidecar's (daemon recovery). `stop`
 * waits for in-flight block requests: a write waiting for room in a full journal (no release
 * comes now) is admitted first, or the stop never returns. False when no QEMU runs to stop;
 * rejects when the stop fails.
 */
export async function stopForAnswer(
  vm: VmInstance,
  outputs: Pick<EpochOutputs, 'quiesce'> | undefined,
  opts?: QmpExecuteOptions,
): Promise<boolean> {
  outputs?.quiesce?.();
  const q = vm.qemu;
  if (!q || q.hasExited) return false;
  await stop(q.qmp, opts);
  return true;
}

/** Fault injection (hold-completion): the stream is complete, but the test has not released the completion yet. */
export function completionHeld(ctx: DestContext): boolean {
  if (!ctx.faults.holdCompletion || existsSync(path.join(ctx.vm.dir, HOLD_COMPLETION_RELEASE))) return false;
  if (!ctx.completionHeldLogged) ctx.log.warn('fault injection: holding the completion request', { file: HOLD_COMPLETION_RELEASE });
  ctx.completionHeldLogged = true;
  return true;
}

/**
 * Every checkpoint taken is acknowledged, the last of them is the final one: ask the source to
 * complete. Outputs stay held and this side stops fencing by kill; only the source's answer
 * decides. Recorded first, so that a restarted sidecar waits for that answer too.
 */
export async function requestCompletion(ctx: DestContext, finalEpoch: number): Promise<void> {
  await writeCompletingRecord(completingRecordPath(ctx.vm), finalEpoch);
  ctx.finalEpoch = finalEpoch;
  ctx.phase.to('completing', { finalEpoch });
  // The source may record completion any moment now: this QEMU may then hold the only
  // running copy, so this sidecar's death must freeze it, not destroy it.
  ctx.guard?.pauseOnly();
  if (ctx.faults.cutCompletion === CUT_COMPLETION.request) {
    ctx.log.warn('fault injection: dropping the completion request and the channel', { finalEpoch });
    ctx.ch.close();
    return;
  }
  await ctx.ch
    .send({ type: 'control', body: { kind: 'complete', migrationId: ctx.id, finalEpoch } })
    .catch(ignored(ctx.log, 'the channel may be closed: silence pauses the guest and the source re-answers on a new channel'));
}

/** The hold-writeback faults apply: the VM has a disk and the switch is set. */
const holdsWriteback = (ctx: DestContext): boolean =>
  (ctx.faults.holdWriteback || ctx.faults.holdWritebackEarly) === true && ctx.journal !== undefined;

/** The source recorded completion: the VM is this host's; its held outputs may go. */
export async function finishCompleted(ctx: DestContext, epoch: number): Promise<void> {
  ctx.phase.to('handover', { epoch });
  ctx.stopTimers();
  // After a hold the epoch loop may wait for room no ACK will make: end it (run() ignores
  // the failure once stopped). A barrier under way ends first (its `cont`, its seal), so
  // the guest is not left stopped and pass-through comes after the last seal.
  ctx.window?.fail(new TetherError('ERR_MIGRATION_ENDED', 'the source gave the rollback up'));
  ctx.hashesDone.resolve();
  await ctx.barrierEnd.promise;
  ctx.tracker?.close().catch(ignored(ctx.log, 'the tracker is closed at the end whatever its state'));
  ctx.phase.to('completed', { finalEpoch: epoch });
  await runHere(
    {
      vm: ctx.vm,
      journal: ctx.journal,
      log: ctx.log,
      paused: ctx.pausedForAnswer,
      release: () => releaseToThisHost(ctx),
      afterStep: cleanupCrashPoint(ctx.faults),
      ...(holdsWriteback(ctx) ? { hold: writeBackHolds(ctx) } : {}),
    },
    epoch,
  );
  // The source closes the channel once it has read RESOLVED; this only reaps a silent one.
  setTimeout(() => ctx.ch.close(), 5000).unref();
  ctx.done.resolve('completed');
}

/** What runHere acts on: the live destination's VM and journal, or those a restarted sidecar recovered. */
export interface Handover {
  vm: VmInstance;
  journal: BlockJournal | undefined;
  log: Logger;
  /** The guest was paused for the answer (stopForAnswer): `cont` it first. */
  paused: boolean;
  /** Outputs pass, the VM runs here (vm.place): called once completion is in the journal's log (or failed to be). */
  release: () => void;
  /** Crash points while the completion records go (crash-cleanup-step). */
  afterStep: (step: number) => void;
  /** Fault injection (hold-writeback): before the log records completion, before and after the records go. */
  hold?: { beforeMark(): Promise<void>; beforeDrop(): Promise<void>; afterDrop(): Promise<void> };
}

/**
 * The source recorded completion: the VM runs here. The guest resumes, the journal's log
 * records the outcome and its write-back starts (release), the completion records go, then
 * the disk window closes. Every step logs its failure and the next runs: the VM is this
 * host's whatever fails. Shared by the live destination (finishCompleted) and a sidecar
 * restarted inside the handshake (daemon recovery).
 */
export async function runHere(h: Handover, epoch: number): Promise<void> {
  const { vm, journal, log } = h;
  const q = vm.qemu;
  if (h.paused && q && !q.hasExited)
    await cont(q.qmp).catch((e: unknown) => log.error('cont after the answer failed', { error: errorFields(e) }));
  await h.hold?.beforeMark();
  // In the log before the image is written: a sidecar restarted during the write-back
  // finishes it from the log (docs/journal.md).
  const marked = await journal?.markCompleted(epoch).then(
    () => true,
    (e: unknown) => {
      log.error('recording completion in the journal log failed', { error: errorFields(e) });
      return false;
    },
  );
  h.release();
  // The completion records go only once the journal is in the image (or the log says
  // the outcome): until then a restart must not serve the image pass-through.
  if (marked === false) await journal?.drained().catch((e: unknown) => log.warn('the write-back failed', { error: errorFields(e) }));
  await h.hold?.beforeDrop();
  await vm
    .dropCompletingRecords(h.afterStep)
    .catch((e: unknown) => log.error('dropping the completion records failed', { error: errorFields(e) }));
  await h.hold?.afterDrop();
  await closeDiskWindow(vm, journal, log);
}

/** Outputs pass, the NIC relays leave QEMU's path, the guard and the stream's TLS go: the VM runs here. */
function releaseToThisHost(ctx: DestContext): void {
  ctx.outputs.passThrough();
  void ctx.opts.onCompleted?.(ctx.vm).catch((e: unknown) => ctx.log.error('detaching the NIC relays failed', { error: errorFields(e) }));
  ctx.guard?.disarm();
  ctx.vm.place = 'running';
  void ctx.tls?.tearDown(); // not awaited: nothing below may wait on QMP
}

/** Fault injection (hold-writeback, hold-writeback-early): runHere's holds. */
function writeBackHolds(ctx: DestContext): NonNullable<Handover['hold']> {
  return {
    beforeMark: () => waitForTwoExtents(ctx),
    beforeDrop: async () => {
      if (ctx.faults.holdWritebackEarly) await holdWritebackForever(ctx);
    },
    afterDrop: async () => {
      await ctx.writeBackHeld.promise;
      ctx.log.warn('fault injection: write-back held after its first extent, completion records dropped', {
        extents: ctx.journal!.extentCount,
      });
    },
  };
}

/**
 * Fault injection (hold-writeback): a write-back of at least two extents, so the hold after
 * the first one leaves the image half written: the guest runs and keeps writing into the
 * open epoch meanwhile.
 */
async function waitForTwoExtents(ctx: DestContext): Promise<void> {
  ctx.log.warn('fault injection: waiting for two journaled extents before the write-back');
  while (ctx.journal!.mode === 'journal' && ctx.journal!.extentCount < 2) await sleep(10);
}

/** Fault injection (hold-writeback-early): held with the completion records kept; the test kills this sidecar here. */
async function holdWritebackForever(ctx: DestContext): Promise<never> {
  await ctx.writeBackHeld.promise;
  ctx.log.warn('fault injection: write-back held after its first extent, completion records kept', {
    extents: ctx.journal!.extentCount,
  });
  return new Promise<never>(() => {}); // never: the test kills this sidecar here
}

/**
 * The VM is this host's: its disk leaves the sidecar for QEMU's own file node (docs/disk.md,
 * "The switch"). Only after the journal's write-back is durable in the image — the file node
 * reads the image, and nothing may still be held in the sidecar — and after the source has
 * recorded completion (this runs on its answer), so the source's QEMU, a post-copy source that
 * inactivated its image at switchover, holds no lock the reopen could conflict with. A failure
 * leaves the disk on the sidecar's NBD export in pass-through: the guest keeps its disk.
 * Also for a QEMU adopted inside its window after the source's `completed` (daemon recovery,
 * `tether vm adopt`): no journal then, the sidecar serves the image itself.
 */
export async function closeDiskWindow(vm: VmInstance, journal: BlockJournal | undefined, log: Logger): Promise<void> {
  if (!vm.nbd) return;
  const t0 = nowMs();
  try {
    await journal?.drained();
    const drainMs = Math.round((nowMs() - t0) * 100) / 100;
    const r = await vm.detachDiskWindow();
    log.info('disk detached at completion', { drainMs, ...r });
  } catch (e) {
    log.error('closing the disk window failed: the disk stays on the sidecar (pass-through)', { error: errorFields(e) });
  }
}
