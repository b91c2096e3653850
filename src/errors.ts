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

/*
 * Codes of the disk and its journal (src/disk/):
 *   ERR_DISK_RANGE               a block request outside the disk (offset/length bad or past the end)
 *   ERR_JOURNAL_INVALID_OPTION   journal maxBytes / maxExtentBytes out of range
 *   ERR_JOURNAL_STATE            journal() or seal(k) called in the wrong mode or for the wrong epoch
 *   ERR_JOURNAL_DISCARDED        a request after the destination fenced and dropped its journal
 *   ERR_JOURNAL_WRITEBACK        writing the journal to the image after the final ACK failed
 */
