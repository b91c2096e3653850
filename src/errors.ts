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
