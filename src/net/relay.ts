/**
 * The framing of QEMU's filter-redirector with `vnet_hdr_support=on` (net/filter-mirror.c,
 * net_fill_rstate in net/net.c), both directions:
 *
 *   u32 BE  len        bytes that follow the next field: virtio-net header + Ethernet frame
 *   u32 BE  vnetLen    length of the virtio-net header at the start of the payload (12)
 *   len     payload    header (vnetLen bytes) then the frame
 *
 * QEMU's own announce RARPs (`announce-self`, after an incoming migration) are sent by
 * QEMU with qemu_send_packet_raw, without a header, yet labelled vnetLen 12: written back
 * as they are, the tap reads their first 12 bytes as a header and drops them. They are
 * recognised (a broadcast RARP frame where the header would be: no valid header starts
 * with 0xff flags) and given a zero header. Such a record is QEMU's, never the guest's
 * (the guest's frames always carry the header), and carries no guest state: it may
 * leave the destination at once.
 *
 * I/O-free: RelayDecoder.push(chunk) returns the records completed by the chunk, each
 * copied into memory of its own (a held frame must not pin a 64 KiB socket chunk).
 */
import { TetherError } from '../errors.ts';
import { MAX_RECORD_BYTES, VNET_HDR_BYTES } from '../gate/reserve.ts';

/** The virtio-net header QEMU's tap backend uses with vnet_hdr=on; a payload longer than
 * MAX_RECORD_BYTES (QEMU's NET_BUFSIZE) means lost framing. Both are defined with the gate's
 * bound, which is derived from them (src/gate/reserve.ts). */
export { MAX_RECORD_BYTES, VNET_HDR_BYTES };
/** Shortest Ethernet frame passed on: a header alone (tun answers EINVAL to anything shorter). */
export const MIN_FRAME_BYTES = 14;
const PREFIX = 8;
const ETH_P_RARP = 0x8035;

export type RelayRecord =
  /** A guest frame: `frame` is a view whose 12 preceding bytes (same memory) are its header. */
  | { kind: 'frame'; frame: Buffer }
  /** QEMU's announce, header fixed up: `frame` as above. */
  | { kind: 'announce'; frame: Buffer }
  /** Dropped: shorter than an Ethernet header, or a header length other than 12 (or 0). */
  | { kind: 'runt' | 'malformed'; bytes: number };

/** The header preceding `frame` (every frame a RelayDecoder returns has one in front of it). */
export function headerOf(frame: Buffer): Buffer {
  return Buffer.from(frame.buffer, frame.byteOffset - VNET_HDR_BYTES, VNET_HDR_BYTES);
}

/** QEMU's RARP announce without its header (see above). */
function headerlessAnnounce(p: Buffer): boolean {
  if (p.length < 14 || p.readUInt16BE(12) !== ETH_P_RARP) return false;
  for (let i = 0; i < 6; i++) if (p[i] !== 0xff) return false;
  return true;
}

export class RelayDecoder {
  #buf: Buffer = Buffer.alloc(0);
  #failed: TetherError | null = null;

  /** Bytes held for an incomplete record (at most MAX_RECORD_BYTES + 8 + a chunk). */
  get buffered(): number {
    return this.#buf.length;
  }

  push(chunk: Buffer): RelayRecord[] {
    if (this.#failed) throw this.#failed;
    const b = this.#buf.length === 0 ? chunk : Buffer.concat([this.#buf, chunk]);
    const out: RelayRecord[] = [];
    let pos = 0;
    while (b.length - pos >= PREFIX) {
      const len = b.readUInt32BE(pos);
      const vlen = b.readUInt32BE(pos + 4);
      if (len === 0 || len > MAX_RECORD_BYTES) {
        this.#failed = new TetherError('ERR_RELAY_FRAMING', `relay record of ${len} bytes (at most ${MAX_RECORD_BYTES})`, { len });
        this.#buf = Buffer.alloc(0);
        throw this.#failed;
      }
      if (b.length - pos - PREFIX < len) break;
      const p = b.subarray(pos + PREFIX, pos + PREFIX + len);
      pos += PREFIX + len;
      out.push(classify(p, vlen));
    }
    // the remainder is copied: `b` may be a whole socket chunk
    this.#buf = pos === b.length ? Buffer.alloc(0) : Buffer.from(b.subarray(pos));
    return out;
  }
}

function classify(p: Buffer, vlen: number): RelayRecord {
  if (vlen === VNET_HDR_BYTES && headerlessAnnounce(p)) return { kind: 'announce', frame: withZeroHeader(p) };
  if (vlen === 0) {
    // no header at all (a filter without vnet_hdr_support): give it an empty one
    return p.length < MIN_FRAME_BYTES ? { kind: 'runt', bytes: p.length } : { kind: 'frame', frame: withZeroHeader(p) };
  }
  if (vlen !== VNET_HDR_BYTES) return { kind: 'malformed', bytes: p.length };
  if (p.length < VNET_HDR_BYTES + MIN_FRAME_BYTES) return { kind: 'runt', bytes: p.length };
  const own = Buffer.allocUnsafeSlow(p.length);
  p.copy(own);
  return { kind: 'frame', frame: own.subarray(VNET_HDR_BYTES) };
}

function withZeroHeader(frame: Buffer): Buffer {
  const own = Buffer.allocUnsafeSlow(VNET_HDR_BYTES + frame.length);
  own.fill(0, 0, VNET_HDR_BYTES);
  frame.copy(own, VNET_HDR_BYTES);
  return own.subarray(VNET_HDR_BYTES);
}

/** Records for QEMU's indev, each frame with the header in front of it. */
export function encodeRecords(frames: readonly Buffer[]): Buffer {
  let total = 0;
  for (const f of frames) total += PREFIX + VNET_HDR_BYTES + f.length;
  const out = Buffer.allocUnsafe(total);
  let pos = 0;
  for (const f of frames) {
    out.writeUInt32BE(VNET_HDR_BYTES + f.length, pos);
    out.writeUInt32BE(VNET_HDR_BYTES, pos + 4);
    headerOf(f).copy(out, pos + PREFIX);
    f.copy(out, pos + PREFIX + VNET_HDR_BYTES);
    pos += PREFIX + VNET_HDR_BYTES + f.length;
  }
  return out;
}
