/**
 * The completion handshake's shared words (docs/completion.md): the three control messages
 * both halves exchange and the steps at which a test may cut it. The source half is
 * completion/source.ts, the destination half completion/destination.ts; both build their
 * messages here so the two sides cannot drift apart.
 *
 *   D → S  COMPLETE  { migrationId, finalEpoch }            the destination asks to own the VM
 *   S → D  RESOLVE   { migrationId, vm, outcome, epoch }    the source's answer, after its durable record
 *   D → S  RESOLVED  { migrationId, known, code? }          the destination confirms (known=false: not its migration)
 */
import type { Message } from '../../peer/messages.ts';
import type { ErrorCode } from '../../errors.ts';

/** What the source answers a completion request with. */
export type CompletionOutcome = 'completed' | 'rolled-back';

/** The destination's verdict on a RESOLVE: known, or why not (the code travels in RESOLVED, the message is logged). */
export type ResolveAnswer = { known: true } | ResolveRefusal;
export type ResolveRefusal = { known: false; code: ErrorCode; message: string };

/** COMPLETE: the destination asks the source to record completion at `finalEpoch`. */
export function completeMessage(migrationId: string, finalEpoch: number): Message {
  return { type: 'control', body: { kind: 'complete', migrationId, finalEpoch } };
}

/** RESOLVE: the source's answer to the completion request of migration `migrationId`. */
export function resolveMessage(migrationId: string, vm: string, outcome: CompletionOutcome, epoch: number): Message {
  return { type: 'control', body: { kind: 'resolve', migrationId, vm, outcome, epoch } };
}

/** RESOLVED: the destination's confirmation of a RESOLVE (known=false names the code why not). */
export function resolvedMessage(migrationId: string, a: { known: boolean; code?: ErrorCode }): Message {
  return { type: 'control', body: { kind: 'resolved', migrationId, known: a.known, ...(a.known ? {} : { code: a.code }) } };
}

/** Steps of the completion handshake at which the fault cut-completion=N drops the channel (faults.ts). */
export const CUT_COMPLETION = {
  /** D: drops its request instead of sending it (D is already completing: it holds outputs and pauses). */
  request: 1,
  /** S: got the request, drops the channel before recording completion (S then rolls back). */
  beforeRecord: 2,
  /** S: recorded completion durably, drops the channel instead of answering (S then re-answers on a new channel). */
  afterRecord: 3,
  /** S: recorded completion durably, then its sidecar dies (SIGKILL of itself; its restart finishes the hand-over). */
  crashAfterRecord: 4,
  /** D: drops S's answer and the channel (S re-answers on a new channel). */
  answer: 5,
  /** D: its sidecar dies (SIGKILL of itself) on S's answer, before acting on it; its restart waits for the answer again. */
  crashOnAnswer: 6,
} as const;
