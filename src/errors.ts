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

// ---------------------------------------------------------------------------
// Catalogue (issue 5, core-b): codes added for hardening, one line each. The
// coordinator merges this with the codes still spelled inline elsewhere.
// ---------------------------------------------------------------------------
export const ERROR_CODES = {
  /** The destination has no `<vm>.yaml` in its vmConfigDir (or cannot load it): it refuses the prepare. */
  ERR_PEER_UNKNOWN_VM: 'the destination has no configuration for this VM',
  /** The device-model digest the source sent differs from the one of the destination's own config. */
  ERR_PEER_DEVICE_MODEL: "the destination's VM configuration builds a different device model",
  /** The destination's fenceTimeoutMs is not below the source's failoverTimeoutMs: D could outlive S's lease. */
  ERR_PEER_TIMEOUTS: "the destination's fence timeout is not below the source's failover timeout",
  /** The destination already runs, or is already receiving, a VM of this name. */
  ERR_PEER_VM_BUSY: 'the destination already has this VM running or incoming',
  /** The sidecar stopped (SIGTERM/SIGINT) while the request ran; guests keep running, a restart recovers. */
  ERR_DAEMON_SHUTDOWN: 'the sidecar is shutting down; the request was not finished',
  /** vm.json or the migration marker failed its magic/version/length/checksum check. */
  ERR_STATE_FILE_CORRUPT: 'a persisted VM state file is damaged',
  /** vm.json or the migration marker has a format version this sidecar does not read. */
  ERR_STATE_FILE_VERSION: 'a persisted VM state file has an unsupported version',
} as const;
