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
 * Codes of the packet gate and guest NICs (src/gate/, src/net/):
 *   ERR_GATE_FRAME_EMPTY      the stream netdev carried a zero-length frame (framing lost)
 *   ERR_GATE_FRAME_TOO_LARGE  a frame longer than MAX_FRAME_BYTES (65553) on the stream netdev or for the TAP
 *   ERR_GATE_EPOCH            seal/release of an epoch out of order (a bug in the caller, nothing changed)
 *   ERR_TAP                   creating, configuring, reading or writing a TAP device failed
 */
