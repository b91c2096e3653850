/**
 * Payload codec of checkpoint content (messages.ts) and the COMMIT digest. Pure: no
 * sockets, no files. The frame around each payload (header, CRC, MAC) and the peer
 * channel's own messages are src/peer/codec.ts.
 *
 * Payloads (all integers big-endian; u64 values are < 2^53; ranges are checked):
 *   BEGIN     0x10  epoch u64
 *   PAGES     0x11  epoch u64 ‖ count u32 ‖ pfn u32 × count ‖ zero bitmap ⌈count/8⌉
 *                   (bit i = byte i>>3, bit i&7 LSB first; 1 = zero page; padding bits 0)
 *                   ‖ data (4096 × non-zero count, in pfn order)
 *   DISK      0x12  epoch u64 ‖ offset u64 ‖ data
 *   DISKZERO  0x15  epoch u64 ‖ offset u64 ‖ length u64  (exactly 24 bytes; 1 <= length <=
 *                   MAX_DISK_ZERO_BYTES: the range reads as zeroes once applied)
 *   DEVSTATE  0x13  epoch u64 ‖ data
 *   COMMIT    0x14  epoch u64 ‖ pages u32 ‖ diskBytes u64 ‖ devstateBytes u64 ‖ digest(32)
 * Every payload is canonical: decode(encode(m)) equals m and there is one encoding per message.
 */
import { createHash } from 'node:crypto';
import {
  MAX_DISK_ZERO_BYTES,
  PAGE_SIZE,
  type CheckpointMessage,
  type CheckpointMessageType,
  type DigestedMessage,
  type PagesMessage,
} from './messages.ts';
import { checkEpoch, checkSize, checkU32, checkU64, invalid, malformed, Reader, u64, writeU64 } from './wire.ts';

export const DIGEST_SIZE = 32;

/** Frame type codes of checkpoint content (the peer's own codes: src/peer/codec.ts). */
export const CHECKPOINT_TYPE_CODES = {
  begin: 0x10,
  pages: 0x11,
  disk: 0x12,
  devstate: 0x13,
  commit: 0x14,
  diskzero: 0x15,
} as const satisfies Record<CheckpointMessageType, number>;

/** Count of zero-page entries; throws if the mask is not 0/1 or not the pfns' length. */
export function countZeroPages(pfns: Uint32Array, zero: Uint8Array): number {
  if (!(pfns instanceof Uint32Array) || !(zero instanceof Uint8Array) || zero.length !== pfns.length) {
    throw invalid('pages: pfns must be a Uint32Array and zero a Uint8Array of the same length');
  }
  let zeros = 0;
  for (let i = 0; i < zero.length; i++) {
    const z = zero[i]!;
    if (z > 1) throw invalid('pages: zero entries must be 0 or 1', { index: i });
    zeros += z;
  }
  return zeros;
}

function pagesParts(msg: PagesMessage): Buffer[] {
  checkEpoch(msg.epoch);
  const n = msg.pfns.length;
  const zeros = countZeroPages(msg.pfns, msg.zero);
  if (!Buffer.isBuffer(msg.data) || msg.data.length !== (n - zeros) * PAGE_SIZE) {
    throw invalid('pages.data must hold 4096 bytes per non-zero page', { pages: n, zeros });
  }
  const bitmapLen = (n + 7) >>> 3;
  const meta = Buffer.alloc(12 + 4 * n + bitmapLen);
  writeU64(meta, msg.epoch, 0);
  meta.writeUInt32BE(n, 8);
  let off = 12;
  for (let i = 0; i < n; i++, off += 4) meta.writeUInt32BE(msg.pfns[i]!, off);
  for (let i = 0; i < n; i++) {
    if (msg.zero[i] === 1) meta[off + (i >>> 3)]! |= 1 << (i & 7);
  }
  return msg.data.length === 0 ? [meta] : [meta, msg.data];
}

/**
 * The canonical payload of a checkpoint message as a list of buffers (big data is not
 * copied). Throws ERR_PROTO_INVALID_MESSAGE for a message that cannot be encoded.
 */
export function checkpointPayloadParts(msg: CheckpointMessage): Buffer[] {
  switch (msg.type) {
    case 'begin':
      checkEpoch(msg.epoch);
      return [u64(msg.epoch)];
    case 'pages':
      return pagesParts(msg);
    case 'disk': {
      checkEpoch(msg.epoch);
      checkU64('disk.offset', msg.offset);
      if (!Buffer.isBuffer(msg.data)) throw invalid('disk.data must be a Buffer');
      if (msg.offset + msg.data.length > Number.MAX_SAFE_INTEGER) throw invalid('disk extent ends past 2^53');
      const head = Buffer.allocUnsafe(16);
      writeU64(head, msg.epoch, 0);
      writeU64(head, msg.offset, 8);
      return [head, msg.data];
    }
    case 'diskzero': {
      checkEpoch(msg.epoch);
      checkU64('diskzero.offset', msg.offset);
      if (!Number.isSafeInteger(msg.length) || msg.length < 1 || msg.length > MAX_DISK_ZERO_BYTES) {
        throw invalid(`diskzero.length must be an integer in [1, ${MAX_DISK_ZERO_BYTES}]`, { length: msg.length });
      }
      if (msg.offset + msg.length > Number.MAX_SAFE_INTEGER) throw invalid('disk zero extent ends past 2^53');
      const b = Buffer.allocUnsafe(24);
      writeU64(b, msg.epoch, 0);
      writeU64(b, msg.offset, 8);
      writeU64(b, msg.length, 16);
      return [b];
    }
    case 'devstate':
      checkEpoch(msg.epoch);
      if (!Buffer.isBuffer(msg.data)) throw invalid('devstate.data must be a Buffer');
      return [u64(msg.epoch), msg.data];
    case 'commit': {
      checkEpoch(msg.epoch);
      checkU32('commit.pages', msg.pages);
      checkU64('commit.diskBytes', msg.diskBytes);
      checkU64('commit.devstateBytes', msg.devstateBytes);
      checkSize('commit.digest', msg.digest, DIGEST_SIZE);
      const head = Buffer.allocUnsafe(28);
      writeU64(head, msg.epoch, 0);
      head.writeUInt32BE(msg.pages, 8);
      writeU64(head, msg.diskBytes, 12);
      writeU64(head, msg.devstateBytes, 20);
      return [head, msg.digest];
    }
    default: {
      const never: never = msg;
      throw invalid('unknown message type', { type: (never as { type: unknown }).type });
    }
  }
}

function decodePages(r: Reader): PagesMessage {
  const epoch = r.u64();
  const n = r.u32();
  // Bound n by the payload before allocating anything proportional to it.
  if (n > r.remaining() / 4) throw malformed('pages: count exceeds payload');
  const pfnBytes = r.bytes(4 * n);
  const bitmap = r.bytes((n + 7) >>> 3);
  const pfns = new Uint32Array(n);
  for (let i = 0; i < n; i++) pfns[i] = pfnBytes.readUInt32BE(4 * i);
  const zero = new Uint8Array(n);
  let zeros = 0;
  for (let i = 0; i < n; i++) {
    const z = (bitmap[i >>> 3]! >>> (i & 7)) & 1;
    zero[i] = z;
    zeros += z;
  }
  if ((n & 7) !== 0 && bitmap[bitmap.length - 1]! >>> (n & 7) !== 0) {
    throw malformed('pages: bitmap padding bits set');
  }
  const data = r.rest();
  if (data.length !== (n - zeros) * PAGE_SIZE) {
    throw malformed('pages: data length does not match non-zero page count', {
      pages: n,
      zeros,
      dataBytes: data.length,
    });
  }
  return { type: 'pages', epoch, pfns, zero, data };
}

/**
 * Parses the payload of a checkpoint message (its frame already passed CRC and MAC checks)
 * up to its end; the caller checks that nothing is left (Reader.end()).
 */
export function readCheckpointPayload(type: CheckpointMessageType, r: Reader): CheckpointMessage {
  switch (type) {
    case 'begin':
      return { type, epoch: r.u64() };
    case 'pages':
      return decodePages(r);
    case 'disk': {
      const epoch = r.u64();
      const offset = r.u64();
      const data = r.rest();
      if (offset + data.length > Number.MAX_SAFE_INTEGER) throw malformed('disk: extent ends past 2^53');
      return { type, epoch, offset, data };
    }
    case 'diskzero': {
      const epoch = r.u64();
      const offset = r.u64();
      const length = r.u64();
      if (length < 1 || length > MAX_DISK_ZERO_BYTES) {
        throw malformed(`diskzero: length ${length} outside [1, ${MAX_DISK_ZERO_BYTES}]`, { length });
      }
      if (offset + length > Number.MAX_SAFE_INTEGER) throw malformed('diskzero: extent ends past 2^53');
      return { type, epoch, offset, length };
    }
    case 'devstate':
      return { type, epoch: r.u64(), data: r.rest() };
    case 'commit':
      return {
        type,
        epoch: r.u64(),
        pages: r.u32(),
        diskBytes: r.u64(),
        devstateBytes: r.u64(),
        digest: r.bytes(DIGEST_SIZE),
      };
  }
}

/** COMMIT.digest: SHA-256 over type u8 ‖ length u32 ‖ payload of each digested message. */
export class CheckpointDigest {
  private readonly hash = createHash('sha256');

  /** Adds one PAGES/DISK/DISKZERO/DEVSTATE message; returns its payload length. */
  update(msg: DigestedMessage): number {
    const parts = checkpointPayloadParts(msg);
    let length = 0;
    for (const p of parts) length += p.length;
    const prefix = Buffer.allocUnsafe(5);
    prefix[0] = CHECKPOINT_TYPE_CODES[msg.type];
    prefix.writeUInt32BE(length, 1);
    this.hash.update(prefix);
    for (const p of parts) this.hash.update(p);
    return length;
  }

  digest(): Buffer {
    return this.hash.digest();
  }
}
