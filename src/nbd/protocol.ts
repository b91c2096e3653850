/**
 * NBD wire facts (NetworkBlockDevice/nbd doc/proto.md), and the encoders of the replies'
 * fixed layouts (session.ts and server.ts use them). All integers are big-endian.
 *
 * Fixed newstyle handshake, as this server speaks it:
 *   S: 64 NBDMAGIC, 64 IHAVEOPT, 16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
 *   C: 32 client flags (only C_FIXED_NEWSTYLE, C_NO_ZEROES; anything else: the server
 *      MUST drop the connection)
 *   then options, each  C: 64 IHAVEOPT, 32 option, 32 length, <length> bytes data
 *   answered (except EXPORT_NAME) by replies  S: 64 REPLY_MAGIC, 32 option, 32 reply type,
 *   32 length, <length> bytes data. The client sends no option before the final reply
 *   to the previous one.
 *   OPT_GO ending in REP_ACK (or a satisfiable EXPORT_NAME, answered by 64 size, 16
 *   transmission flags, and 124 zero bytes unless C_NO_ZEROES) enters transmission.
 *
 * Transmission:
 *   C: request  32 REQUEST_MAGIC, 16 command flags, 16 type, 64 handle, 64 offset,
 *               32 length, then <length> bytes only for CMD_WRITE            (28 + data)
 *   S: simple reply  32 SIMPLE_REPLY_MAGIC, 32 error, 64 handle, then <length> bytes only
 *               for a successful CMD_READ                                    (16 + data)
 *   Replies may come in any order; the handle correlates them. CMD_DISC has no reply.
 */

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT": server greeting and every option
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;

// Handshake flags (server, 16 bits)
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
// Client flags (32 bits)
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

// Transmission flags (16 bits). The server MUST NOT advertise a feature it lacks.
export const TFLAG_HAS_FLAGS = 1 << 0; // MUST always be set
export const TFLAG_READ_ONLY = 1 << 1;
export const TFLAG_SEND_FLUSH = 1 << 2;
export const TFLAG_SEND_FUA = 1 << 3;
export const TFLAG_ROTATIONAL = 1 << 4;
export const TFLAG_SEND_TRIM = 1 << 5;
export const TFLAG_SEND_WRITE_ZEROES = 1 << 6; // also exposes CMD_FLAG_NO_HOLE
export const TFLAG_SEND_DF = 1 << 7; // only with structured replies: never here
export const TFLAG_CAN_MULTI_CONN = 1 << 8;
export const TFLAG_SEND_CACHE = 1 << 10;
export const TFLAG_SEND_FAST_ZERO = 1 << 11;

// Options (32 bits)
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;

// Option reply types (32 bits); errors have bit 31 set and MAY carry a message string.
export const REP_ACK = 1;
export const REP_SERVER = 2; // 32 name length, name, [description]
export const REP_INFO = 3; // 16 info type, payload
const REP_ERR = 0x80000000;
export const REP_ERR_UNSUP = REP_ERR + 1;
export const REP_ERR_POLICY = REP_ERR + 2;
export const REP_ERR_INVALID = REP_ERR + 3;
export const REP_ERR_PLATFORM = REP_ERR + 4;
export const REP_ERR_TLS_REQD = REP_ERR + 5;
export const REP_ERR_UNKNOWN = REP_ERR + 6; // OPT_INFO/GO: no such export
export const REP_ERR_SHUTDOWN = REP_ERR + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const REP_ERR_TOO_BIG = REP_ERR + 9;

// NBD_REP_INFO types (16 bits)
export const INFO_EXPORT = 0; // 64 size, 16 transmission flags (length 12 with the type); mandatory before ACK
export const INFO_NAME = 1; // name string
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3; // 32 minimum, 32 preferred, 32 maximum (length 14)

// Commands (16 bits)
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

// Command flags (16 bits). FUA is valid on every command once SEND_FUA is advertised
// (the server MUST accept it, even by ignoring it); NO_HOLE only on WRITE_ZEROES;
// DF, REQ_ONE and FAST_ZERO need features this server does not advertise.
export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

// Error values in replies (not host errno: the spec fixes these numbers).
export const EPERM = 1;
export const EIO = 5;
export const ENOMEM = 12;
export const EINVAL = 22; // unknown command or flag, read/trim beyond the end, oversized length
export const ENOSPC = 28; // write/write-zeroes beyond the end; EDQUOT and EFBIG map here
export const EOVERFLOW = 75;
export const ENOTSUP = 95;
export const ESHUTDOWN = 108;

/** Strings (export names, messages) MUST NOT exceed 4096 bytes. */
export const MAX_STRING_BYTES = 4096;
/**
 * Request payload cap: the spec's interoperable maximum for READ/WRITE is 2^25 (32 MiB),
 * and it says a length below that SHOULD NOT be treated as a denial of service. Larger
 * READ/WRITE/WRITE_ZEROES get EINVAL (a WRITE's payload is skipped, never buffered).
 */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;

export function commandName(type: number): string {
  return ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'][type] ?? `CMD_${type}`;
}

// ---------------------------------------------------------------- fixed-layout encoders

/** An NBD string: valid UTF-8 without NUL, at most 4096 bytes. */
export function decodeName(b: Buffer): string | undefined {
  if (b.length > MAX_STRING_BYTES || b.includes(0)) return undefined;
  const s = b.toString('utf8');
  // Round trip detects invalid UTF-8 (replacement characters would not encode back).
  return Buffer.from(s, 'utf8').equals(b) ? s : undefined;
}

export function encodeOptionReply(opt: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_REPLY_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(opt, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

/** Simple reply header; a successful READ's data follows it on the wire. */
export function encodeSimpleReply(handle: Buffer, error: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8, 0, 8);
  return b;
}
