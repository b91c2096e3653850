import { TetherError } from '../errors.ts';

/**
 * Frame codec of QEMU's `-netdev stream` (and `-netdev socket`): every Ethernet frame is
 * preceded by its length as a 4-byte big-endian unsigned integer. No virtio-net header
 * travels on this socket (the stream backend has no vnet-hdr), so a frame is a plain
 * L2 frame without FCS; QEMU never sends an empty one.
 *
 * I/O-free: push(chunk) returns the complete frames it contains; a partial frame is
 * kept until the rest arrives. The length is checked before any payload is buffered.
 */

/** 4-byte big-endian length prefix. */
export const FRAME_HEADER_BYTES = 4;
/**
 * Largest frame accepted: 65535 (the largest L3 packet an MTU can describe) plus 18
 * bytes of L2 headroom (Ethernet header 14 + one VLAN tag 4). QEMU's own stream
 * receiver refuses frames larger than its 69632-byte buffer (NET_BUFSIZE); without
 * offloads a guest sends at most MTU + 18.
 */
export const MAX_FRAME_BYTES = 65535 + 18;

export class FrameDecoder {
  readonly #max: number;
  /** Header bytes collected so far (a header may itself be split). */
  readonly #hdr = Buffer.alloc(FRAME_HEADER_BYTES);
  #hdrHave = 0;
  /** Payload of the frame being assembled, preallocated once its length is known. */
  #frame: Buffer | null = null;
  #frameHave = 0;
  #failed: TetherError | null = null;

  constructor(maxFrameBytes = MAX_FRAME_BYTES) {
    this.#max = maxFrameBytes;
  }

  /** Bytes held for an incomplete frame (bounded by maxFrameBytes + 4). */
  get buffered(): number {
    return this.#hdrHave + this.#frameHave;
  }

  /**
   * Frames completed by this chunk. A frame that lies wholly inside `chunk` is returned
   * as a view into it (no copy): callers that keep frames past the chunk's life must
   * not reuse the chunk's memory (Node's socket chunks are never reused).
   * After an error the decoder is dead: the stream has lost framing.
   */
  push(chunk: Buffer): Buffer[] {
    if (this.#failed) throw this.#failed;
    const out: Buffer[] = [];
    let pos = 0;
    while (pos < chunk.length) {
      if (this.#frame === null) {
        if (this.#hdrHave === 0 && chunk.length - pos >= FRAME_HEADER_BYTES) {
          const len = this.#check(chunk.readUInt32BE(pos));
          pos += FRAME_HEADER_BYTES;
          if (chunk.length - pos >= len) {
            out.push(chunk.subarray(pos, pos + len));
            pos += len;
            continue;
          }
          this.#frame = Buffer.allocUnsafe(len);
          this.#frameHave = 0;
          continue;
        }
        const n = Math.min(FRAME_HEADER_BYTES - this.#hdrHave, chunk.length - pos);
        chunk.copy(this.#hdr, this.#hdrHave, pos, pos + n);
        this.#hdrHave += n;
        pos += n;
        if (this.#hdrHave < FRAME_HEADER_BYTES) break;
        this.#hdrHave = 0;
        this.#frame = Buffer.allocUnsafe(this.#check(this.#hdr.readUInt32BE(0)));
        this.#frameHave = 0;
        continue;
      }
      const n = Math.min(this.#frame.length - this.#frameHave, chunk.length - pos);
      chunk.copy(this.#frame, this.#frameHave, pos, pos + n);
      this.#frameHave += n;
      pos += n;
      if (this.#frameHave === this.#frame.length) {
        out.push(this.#frame);
        this.#frame = null;
        this.#frameHave = 0;
      }
    }
    return out;
  }

  #check(len: number): number {
    if (len === 0) {
      this.#failed = new TetherError('ERR_GATE_FRAME_EMPTY', 'stream netdev: zero-length frame');
      throw this.#failed;
    }
    if (len > this.#max) {
      this.#failed = new TetherError('ERR_GATE_FRAME_TOO_LARGE', `stream netdev: frame of ${len} bytes exceeds ${this.#max}`, {
        length: len,
        max: this.#max,
      });
      throw this.#failed;
    }
    return len;
  }
}

/** The 4-byte length prefix of one frame. */
export function frameHeader(len: number): Buffer {
  if (len === 0 || len > MAX_FRAME_BYTES) {
    throw new TetherError('ERR_GATE_FRAME_TOO_LARGE', `cannot send a frame of ${len} bytes (1..${MAX_FRAME_BYTES})`, { length: len });
  }
  const h = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  h.writeUInt32BE(len, 0);
  return h;
}

/**
 * Encode many frames into one buffer (one socket write for a whole batch).
 * Frames outside 1..MAX_FRAME_BYTES are refused before anything is written.
 */
export function encodeFrames(frames: readonly Buffer[]): Buffer {
  let total = 0;
  for (const f of frames) {
    if (f.length === 0 || f.length > MAX_FRAME_BYTES) {
      throw new TetherError('ERR_GATE_FRAME_TOO_LARGE', `cannot send a frame of ${f.length} bytes (1..${MAX_FRAME_BYTES})`, {
        length: f.length,
      });
    }
    total += FRAME_HEADER_BYTES + f.length;
  }
  const out = Buffer.allocUnsafe(total);
  let pos = 0;
  for (const f of frames) {
    out.writeUInt32BE(f.length, pos);
    f.copy(out, pos + FRAME_HEADER_BYTES);
    pos += FRAME_HEADER_BYTES + f.length;
  }
  return out;
}
