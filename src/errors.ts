/**
 * The one catalogue of tether's error codes. Every error tether raises is a
 * TetherError whose `code` is a key of ERRORS; tests assert on the code, never
 * on the message text, and operators grep logs for it. A code reached over a
 * wire (a peer's NACK or ABORT, the daemon's answer to the CLI) is checked
 * against this catalogue by `remoteError`, never trusted as is.
 */
export const ERRORS = {
  // --- configuration (src/config)
  ERR_CONFIG_INVALID: 'a configuration field has a wrong value; details.field names it',
  ERR_CONFIG_READ: 'a configuration file cannot be read',
  ERR_CONFIG_YAML: 'a configuration file is not valid YAML',
  ERR_CONFIG_KEY_MODE:
    'peer.keyFile may be read or written by group or others, or is owned by another user (like ssh, refused: chown it, chmod 600 it)',
  ERR_FAULTS_INVALID: 'TETHER_FAULTS names an unknown fault or a bad value',

  // --- CLI and control socket (src/cli, src/control)
  ERR_USAGE: 'a command or control request lacks a parameter or has a wrong one',
  ERR_CONTROL_CONNECT: 'the CLI cannot reach the daemon on its control socket',
  ERR_CONTROL_CLOSED: 'the daemon closed the control socket before answering',
  ERR_CONTROL_LINE_TOO_LONG: 'a control-socket line exceeds the decoder limit',
  ERR_CONTROL_MALFORMED: 'a control-socket line is not a valid request or answer',
  ERR_LISTEN: 'the daemon cannot listen on a configured address or socket',
  ERR_INTERNAL: 'an error without a catalogued code reached the control socket',
  ERR_UNKNOWN: 'a peer or daemon reported a code this build does not know (details.remoteCode)',

  // --- VMs on this host (src/daemon, src/vm)
  ERR_NO_SUCH_VM: 'no VM of that name on this host',
  ERR_VM_EXISTS: 'a VM of that name already exists on this host',
  ERR_VM_ALREADY_RUNNING: 'the VM already runs',
  ERR_VM_NOT_RUNNING: 'the VM has no running QEMU',
  ERR_VM_BUSY: 'the VM is migrating; the request must wait or abort first',
  ERR_DAEMON_SHUTDOWN: 'the sidecar is shutting down; the request was not finished (guests keep running)',
  ERR_STATE_FILE_CORRUPT: 'a persisted VM state file (vm.json, migration marker) failed its magic/length/checksum check',
  ERR_STATE_FILE_VERSION: 'a persisted VM state file has a format version this build does not read',
  ERR_RECOVERY: 'a restarted sidecar cannot bring a VM back to a known state',
  ERR_VM_RECOVERING: 'the restarted sidecar has not finished recovering this VM yet; retry in a moment',
  ERR_VM_UNRECOVERED:
    'the VM is unrecovered (details.cause says why): start, stop and migrations are refused until `tether vm adopt` or `tether vm forget`',
  ERR_VM_QEMU_ALIVE: 'a QEMU this sidecar started for the VM still runs (details.pids); `tether vm forget --force` leaves it running',

  // --- QMP and QEMU processes (src/qmp, src/qemu)
  ERR_QMP_CONNECT: 'the QMP socket cannot be reached',
  ERR_QMP_CLOSED: 'QEMU closed the QMP socket',
  ERR_QMP_TIMEOUT: 'a QMP command got no answer in time',
  ERR_QMP_COMMAND: 'QEMU answered a QMP command with an error',
  ERR_QMP_LINE_TOO_LONG: 'a QMP line exceeds the decoder limit',
  ERR_QMP_MALFORMED: 'a QMP line is not valid JSON of the expected shape',
  ERR_QEMU_START: 'QEMU failed to start',
  ERR_QEMU_EXITED: 'QEMU exited while tether waited on it',
  ERR_QEMU_ADOPT: 'a running QEMU cannot be adopted after a sidecar restart',
  ERR_QEMU_STATUS_TIMEOUT: 'QEMU did not reach the expected run state in time',
  ERR_QEMU_MIGRATION_FAILED: "QEMU's own migration stream failed",
  ERR_QEMU_SCOPE: 'QEMU cannot be started in a transient systemd scope (host config systemd.scope: always, or systemd-run failed)',

  // --- peer channel and checkpoint wire protocol (src/peer/codec.ts, decoder.ts; src/checkpoint/codec.ts)
  ERR_PEER_CONNECT: 'the peer daemon cannot be reached',
  ERR_PEER_HANDSHAKE: 'the peer handshake did not complete',
  ERR_PEER_AUTH: 'the peer failed pre-shared-key authentication',
  ERR_PEER_CLOSED: 'the peer closed the channel',
  ERR_PEER_TIMEOUT: 'the peer did not answer in time',
  ERR_PEER_PROTOCOL: 'the peer sent a message that is wrong at this point',
  ERR_PEER_CONTROL: 'a peer control message is malformed',
  ERR_PEER_UNKNOWN_VM: 'the destination has no configuration for this VM in its vmConfigDir',
  ERR_PEER_DEVICE_MODEL: "the destination's VM configuration builds a different device model than the source's",
  ERR_PEER_TIMEOUTS: "the destination's fence timeout is not below the source's failover timeout",
  ERR_PEER_VM_BUSY: 'the destination already has this VM running or incoming',
  ERR_PEER_MIGRATION_URI:
    "the destination named a migration URI other than tcp:<the address the source's peer channel reached>:<port>; refused before any QMP command, nothing changed",
  ERR_PROTO_BAD_MAGIC: 'a frame does not start with the protocol magic',
  ERR_PROTO_UNSUPPORTED_VERSION: 'a frame has a protocol version this build does not speak',
  ERR_PROTO_UNKNOWN_TYPE: 'a frame has an unknown message type',
  ERR_PROTO_FRAME_TOO_LARGE: 'a frame header announces more than the decoder limit',
  ERR_PROTO_BAD_CRC: "a frame's CRC32 does not match",
  ERR_PROTO_BAD_MAC: "a frame's HMAC does not match (tampered, replayed or reordered)",
  ERR_PROTO_BAD_AUTH: 'the handshake proof is wrong',
  ERR_PROTO_UNAUTHENTICATED: 'a frame arrived without authentication where one is required',
  ERR_PROTO_HANDSHAKE: 'a handshake message is out of order or malformed',
  ERR_PROTO_MALFORMED: 'a frame body does not decode as its message type',
  ERR_PROTO_INVALID_MESSAGE: 'an outgoing message is invalid and was not sent',
  ERR_PROTO_INVALID_OPTION: 'a protocol encoder or decoder option is invalid',
  ERR_PROTO_POISONED: 'the decoder saw a bad frame earlier and accepts nothing more',
  ERR_PROTO_WEAK_KEY: 'the pre-shared key is shorter than 32 bytes',

  // --- checkpoint transactions and the source-side store (src/checkpoint)
  ERR_CKPT: 'a checkpoint was refused (generic NACK cause)',
  ERR_CKPT_EPOCH: 'a checkpoint arrived out of epoch order',
  ERR_CKPT_SEQUENCE: 'checkpoint messages arrived out of order inside a transaction',
  ERR_CKPT_PFN_RANGE: 'a checkpoint page lies beyond guest RAM',
  ERR_CKPT_DUPLICATE_PAGE: 'a checkpoint carries the same page twice',
  ERR_CKPT_TOTALS: "a checkpoint's COMMIT totals differ from what arrived",
  ERR_CKPT_DIGEST: "a checkpoint's COMMIT digest differs from what arrived",
  ERR_CKPT_INCOMPLETE: 'a checkpoint transaction ended before COMMIT',
  ERR_CKPT_TOO_LARGE: 'a checkpoint exceeds the configured size limit',
  ERR_CKPT_WINDOW: 'the destination sent more checkpoints ahead of the last applied one than the window allows',
  ERR_CKPT_INVALID: 'a checkpoint handed to the store is inconsistent',
  ERR_CKPT_INVALID_OPTION: 'a checkpoint store or assembler option is invalid',
  ERR_CKPT_NOT_INITIALIZED: 'the checkpoint store holds no applied checkpoint',
  ERR_CKPT_APPLIED_CORRUPT: 'the applied-epoch record is damaged',
  ERR_CKPT_DEVSTATE_CORRUPT: 'a persisted device-state file is damaged',
  ERR_CKPT_RAM_FILE: 'the RAM file the store applies to is missing or of the wrong size',
  ERR_CKPT_RAM_RESERVE:
    'the source could not allocate its whole RAM file before migrating (its tmpfs is too full): checkpoint pages could not be written; nothing was started',
  ERR_CKPT_IO: 'the store failed to read or write its files',
  ERR_CKPT_COMPLETED: 'the migration completed: no checkpoint is applied after the completion record',
  ERR_CKPT_COMPLETED_CORRUPT: 'the completion record (completed.json) is damaged',
  ERR_CKPT_HALF_APPLIED: 'a failed apply left part of a checkpoint in RAM and could not be finished: no whole state to resume',
  ERR_CKPT_STORE_BROKEN: 'an earlier apply failed; the store accepts nothing more',
  ERR_STAGE_BAD_MAGIC: 'a stage file does not start with its magic',
  ERR_STAGE_UNSUPPORTED_VERSION: 'a stage file has an unknown version',
  ERR_STAGE_BAD_CRC: "a stage file's checksum does not match",
  ERR_STAGE_TRUNCATED: 'a stage file is shorter than its header says',
  ERR_STAGE_MALFORMED: "a stage file's sections are inconsistent",

  // --- dirty-page tracking (src/memory, native/)
  ERR_MEM_NATIVE_MISSING: 'the native addon is not built',
  ERR_MEM_NATIVE_ARGS: 'a native call got a bad argument (type, size, fd, page out of range)',
  ERR_MEM_IO: 'reading the RAM file or pagemap failed',
  ERR_MEM_RAM_FILE: 'the RAM file cannot be opened',
  ERR_MEM_RAM_SIZE: 'the RAM file size differs from the configured guest RAM',
  ERR_MEM_TABLE_SIZE: "the page-hash table does not match guest RAM's page count",
  ERR_MEM_PAGEMAP: '/proc/<pid>/pagemap cannot be read',
  ERR_MEM_SOFTDIRTY_UNSUPPORTED: 'the kernel does not track soft-dirty bits',
  ERR_MEM_SOFTDIRTY_CLEAR: 'clearing soft-dirty bits failed',
  ERR_MEM_SOFTDIRTY_MAPPING: "the RAM file's mapping is not found in QEMU's address space",
  ERR_MEM_SOFTDIRTY_PID: 'the QEMU process to track is gone',
  ERR_MEM_SOFTDIRTY_RECLAIM:
    'soft-dirty refused: swap is on and the RAM mapping is not mlocked (a reclaimed page faulted back by a read loses its soft-dirty bit; docs/lab.md)',
  ERR_MEM_SOFTDIRTY_THP:
    'soft-dirty refused: the RAM mapping is THP-eligible (a page khugepaged collapses, faulted back by a read, loses its soft-dirty bit; docs/lab.md)',
  ERR_MEM_TRACKER_KIND: 'an unknown dirty tracker was requested',
  ERR_MEM_TRACKER_STATE: 'a dirty tracker was used out of order',

  // --- migration driver (src/migrate)
  ERR_NO_MIGRATION: 'the VM is not migrating on this host',
  ERR_MIGRATION_ID_MISMATCH:
    'a resolve (from the peer) or an abort (from the operator) names another migration of the VM than the one this host holds: nothing done',
  ERR_NO_MIGRATION_PORT: 'no free port for an incoming QEMU migration stream',
  ERR_STREAM_TLS: "the QEMU migration stream's TLS credentials could not be set up (key files or QMP object-add)",
  ERR_INCOMING_STALLED:
    "the destination's QEMU stopped answering before its stream was established (a connection holding its TLS handshake): fenced before the switchover",
  ERR_MIGRATION_ENDED: 'the migration ended while a step waited on it',
  ERR_LEASE_EXPIRED: 'nothing heard from the destination within the failover timeout',
  ERR_WINDOW: 'the checkpoint window was used out of order, beyond its bound, or after it failed',
  ERR_FENCED: 'the destination fenced itself: its VM stopped, held outputs dropped',
  ERR_ROLLBACK: 'the source decided to roll back (sent to the destination)',
  ERR_DESTINATION: 'the destination failed without a more precise code',
  ERR_DEST_QEMU_EXITED: "the destination's QEMU exited during the migration",
  ERR_SOURCE_QEMU_EXITED: "the source's QEMU exited during the migration",
  ERR_RESTORE_FAILED: 'the rollback could not bring the VM back on the source',
  ERR_RESTORE_UNAVAILABLE:
    'the source cannot restore the VM (its last checkpoint is not whole, or no standby QEMU loaded it): it does not fence a destination it can reach',
  ERR_COMPLETE_EPOCH: 'the destination asked to complete at a checkpoint other than the one the source applied last',
  ERR_COMPLETING: 'the destination is in the completion handshake: it neither fences nor aborts until the source answers',
  ERR_OUTPUTS_DISCARDED: 'release or pass-through asked of outputs that were already discarded (fenced)',
  ERR_GUARD: "the guard that stops the destination's QEMU when its sidecar dies cannot be armed",
  ERR_STATE_TRANSITION: 'a lifecycle state machine was asked for a transition it does not allow',

  // --- packet gate and guest NICs (src/gate, src/net)
  ERR_RELAY_FRAMING: "a record on a NIC relay's socket announced an empty or over-long payload (framing lost: the relay reconnects)",
  ERR_RELAY_DETACH: 'detaching a NIC relay at completion did not drain in time (the filters were removed anyway)',
  ERR_GATE_EPOCH: 'a gate was sealed or released out of epoch order; nothing changed',
  ERR_TAP: 'creating, configuring, reading or writing a TAP device failed',

  // --- disks: NBD server, image device, block-write journal (src/nbd, src/disk)
  ERR_NBD_CLIENT_FLAGS: 'an NBD client sent handshake flags the server did not advertise; connection dropped',
  ERR_NBD_BAD_MAGIC: 'an NBD option or request lacks its magic number: framing lost, connection dropped',
  ERR_NBD_TOO_MANY_OPTIONS: 'an NBD client sent more handshake options than the server allows; connection dropped',
  ERR_NBD_OPTION_TOO_BIG: 'NBD_OPT_EXPORT_NAME is longer than the option limit; connection dropped',
  ERR_NBD_UNKNOWN_EXPORT: 'NBD_OPT_EXPORT_NAME named no export of this server; connection dropped',
  ERR_NBD_DEVICE_SIZE: "the NBD server was handed a device whose size differs from the export's",
  ERR_NBD_LISTEN: 'the NBD server cannot listen on its unix socket path',
  ERR_NBD_SHORT_READ: 'a block device returned fewer bytes than an NBD READ asked for',
  ERR_DISK_OPEN: 'a disk image cannot be opened, or is not a file or block device',
  ERR_DISK_RANGE: 'a disk request lies outside the image (refused before any I/O)',
  ERR_DISK_CLOSED: 'disk I/O after the device was closed',
  ERR_DISK_DIRECT: 'a read buffer could not be aligned for O_DIRECT on the disk image (the read is not served from the page cache instead)',
  ERR_JOURNAL_INVALID_OPTION: 'a block-write journal bound is out of range',
  ERR_JOURNAL_STATE: 'the journal was sealed or switched in the wrong mode or for an epoch that is not the open one',
  ERR_JOURNAL_DISCARDED: 'a disk request after the destination fenced and dropped its journal (never reaches the image)',
  ERR_JOURNAL_WRITEBACK: 'writing the journal into the image after the final ACK failed',
  ERR_JOURNAL_PENDING: "a destination journal's log of the VM is left from an unfinished migration: the disk is not served pass-through",
  ERR_JOURNAL_LOG: "the destination journal's write-ahead log could not be written or read (the request is not acknowledged)",

  // --- host prerequisites (tether check, src/check)
  ERR_CHECK_PATH: 'a file or directory a configuration names is missing, of the wrong kind, or not readable/writable',
  ERR_CHECK_RAM_DIR: 'ramDir is not on tmpfs (guest RAM files must be shared memory)',
  ERR_CHECK_SPACE: "ramDir's file system has less free room than the RAM files and checkpoint stages of its VMs need",
  ERR_CHECK_BRIDGE: 'a bridge a VM NIC names does not exist on this host, or is not a bridge',
  ERR_CHECK_IMAGE: 'a disk image is missing, not a file or block device, or not readable and writable',
  ERR_CHECK_LOCK: "a disk image's file system does not support locks (ENOLCK, EOPNOTSUPP)",
  ERR_CHECK_QEMU: 'the QEMU binary is missing, does not run, or is older than 7.2',
  ERR_CHECK_QMP: 'QEMU lacks a QMP command or migration capability tether uses',
  ERR_CHECK_KERNEL: 'the kernel lacks a feature tether needs (userfaultfd for post-copy, TUN, KVM)',

  // --- added by the structure pass (issue 15): formerly uncoded throws
  ERR_NBD_INVALID_OPTION: 'an NBD session was given an export or option out of range (size, name, maxPayload)',
  ERR_RELAY_CONNECT: "a NIC relay did not connect to QEMU's filter-redirector sockets in time",
  ERR_DISK_IO:
    'a disk image operation failed or was refused (details.errno names the system error; the NBD server answers with the matching NBD error)',
} as const satisfies Record<`ERR_${string}`, string>;

export type ErrorCode = keyof typeof ERRORS;

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ERRORS, code);
}

export class TetherError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown> | undefined;
  constructor(code: ErrorCode, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'TetherError';
    this.code = code;
    this.details = details;
  }
}

export function isTetherError(e: unknown, code?: ErrorCode): e is TetherError {
  return e instanceof TetherError && (code === undefined || e.code === code);
}

/** The code of any thrown value, for logs and replies: uncatalogued errors become `fallback`. */
export function errorCode(e: unknown, fallback: ErrorCode = 'ERR_INTERNAL'): ErrorCode {
  return e instanceof TetherError ? e.code : fallback;
}

/**
 * An error a remote party reported (a peer's NACK/ABORT, the daemon's answer to
 * the CLI). A code outside the catalogue is kept in details, never as `code`.
 */
export function remoteError(code: string, message: string, details?: Record<string, unknown>): TetherError {
  if (isErrorCode(code)) return new TetherError(code, message, details);
  return new TetherError('ERR_UNKNOWN', message, { ...details, remoteCode: code });
}
