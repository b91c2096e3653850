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

/**
 * Catalogue of stable codes, one line each (codes of the NBD server and the disk; other
 * modules' codes are listed where they are raised until they move here).
 */
export const ERROR_CODES: Readonly<Record<string, string>> = {
  ERR_NBD_CLIENT_FLAGS: 'NBD client sent handshake flags the server did not advertise; connection dropped',
  ERR_NBD_BAD_MAGIC: 'NBD option or request without its magic number: framing lost, connection dropped',
  ERR_NBD_TOO_MANY_OPTIONS: 'NBD client sent more handshake options than the server allows; connection dropped',
  ERR_NBD_OPTION_TOO_BIG: 'NBD_OPT_EXPORT_NAME longer than the option limit; connection dropped',
  ERR_NBD_UNKNOWN_EXPORT: 'NBD_OPT_EXPORT_NAME named no export of this server; connection dropped',
  ERR_NBD_DEVICE_SIZE: 'NbdServer.setDevice with a device whose size differs from the export',
  ERR_NBD_LISTEN: 'NBD server cannot listen on its unix socket path',
  ERR_NBD_SHORT_READ: 'a BlockDevice returned fewer bytes than an NBD READ asked for',
  ERR_DISK_OPEN: 'disk image cannot be opened, or is not a file or block device',
  ERR_DISK_RANGE: 'disk I/O range outside the image (refused before any I/O)',
  ERR_DISK_CLOSED: 'disk I/O after the device was closed',
  ERR_JOURNAL_INVALID_OPTION: 'block-write journal maxBytes / maxExtentBytes out of range',
  ERR_JOURNAL_STATE: 'journal() or seal(k) called in the wrong mode or for an epoch that is not the open one',
  ERR_JOURNAL_DISCARDED: 'disk request after the destination fenced and dropped its journal (never reaches the image)',
  ERR_JOURNAL_WRITEBACK: 'writing the journal to the image after the final ACK failed',
  ERR_QEMU_ARGS: 'QEMU command line cannot be built (e.g. a disk without an NBD socket path)',
};
