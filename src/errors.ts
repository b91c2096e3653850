/**
 * Every error tether raises carries a stable `code`. Tests assert on the code,
 * never on the message text; operators grep logs for it.
 */
export class TetherError extends Error {
  readonly code: string;
  readonly details: Record<string, unknown> | undefined;
  constructor(code: string, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'TetherError';
    this.code = code;
    this.details = details;
  }
}

export function isTetherError(e: unknown, code?: string): e is TetherError {
  return e instanceof TetherError && (code === undefined || e.code === code);
}

// ---- catalogue (issue 5, core-a: completion handshake, whole restores, output latch) ----
// To be unified with the rest of the codes into one catalogue.
export const CORE_A_CODES = {
  ERR_COMPLETE_EPOCH: 'the destination asked to complete at a checkpoint other than the one the source applied last',
  ERR_CKPT_COMPLETED: 'the migration completed: no checkpoint is applied after the completion record',
  ERR_CKPT_COMPLETED_CORRUPT: 'the completion record (completed.json) is damaged',
  ERR_CKPT_HALF_APPLIED: 'a failed apply left part of a checkpoint in RAM and could not be finished: no whole state to resume',
  ERR_OUTPUTS_DISCARDED: 'release or pass-through asked of outputs that were already discarded (fenced)',
  ERR_COMPLETING: 'the destination is in the completion handshake: it neither fences nor aborts until the source answers',
  ERR_GUARD: 'the guard of an incoming QEMU could not be armed (the process is gone or unreadable in /proc)',
  ERR_FAULTS_INVALID: 'TETHER_FAULTS names an unknown switch or a bad value (existing code; new switches cut-completion, fail-apply-*)',
} as const;
