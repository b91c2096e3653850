/**
 * Incremental frame decoder of the peer channel (frame layout: codec.ts). Checks magic,
 * version, announced length (before buffering the payload), type, flags, CRC and MAC, then
 * parses the payload. Pure: no sockets.
 */
import { timingSafeEqual } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { malformed, TWO_32 } from '../checkpoint/wire.ts';
import { TetherError } from '../errors.ts';
import {
  decodePayload,
  FLAG_MAC,
  FRAME_MAGIC,
  FRAME_VERSION,
  frameMac,
  HANDSHAKE_MAX_PAYLOAD,
  HEADER_SIZE,
  isHandshake,
  MAC_SIZE,
  TYPE_BY_CODE,
} from './codec.ts';
import type { Message, MessageType } from './messages.ts';

export interface DecoderOptions {
  /** Largest payload accepted; checked on the header, before the payload is buffered. */
  maxPayload: number;
  /** Receive direction key (directionKeys(...).receive); may also be set later with setKey. */
  key?: Buffer;
  /**
   * Accept non-handshake frames without a MAC while no key is set. Off by default: a
   * network-facing decoder must not accept anything but HELLO/AUTH before the key exists.
   */
  allowUnauthenticated?: boolean;
  /**
   * Handshake mode (the peer channel): until `authenticated()` is called, every frame is
   * limited to HANDSHAKE_MAX_PAYLOAD whatever `maxPayload` says, and parsing stops after
   * an AUTH frame (what follows it stays buffered, unparsed) so that the caller can check
   * the AUTH before any larger frame is admitted.
   */
  handshake?: boolean;
}

interface PendingFrame {
  type: MessageType;
  header: Buffer;
  length: number;
  mac: boolean;
}

/**
 * Incremental frame decoder: `push(chunk)` returns the complete messages it now holds and
 * keeps leftover bytes. Any error poisons it: every later push throws ERR_PROTO_POISONED.
 * Returned messages may share memory with pushed chunks: do not reuse a chunk after pushing.
 */
export class Decoder {
  private readonly maxPayload: number;
  private readonly allowUnauthenticated: boolean;
  private key: Buffer | undefined;
  private seq = 0;
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Parser state: waiting for a header (null) or for the body of this frame. */
  private pending: PendingFrame | null = null;
  private poison: TetherError | null = null;
  /** Handshake mode: not yet authenticated (see DecoderOptions.handshake). */
  private preAuth: boolean;
  /** Handshake mode: an AUTH was returned; nothing more is parsed until authenticated(). */
  private authSeen = false;

  constructor(opts: DecoderOptions) {
    if (!Number.isSafeInteger(opts.maxPayload) || opts.maxPayload < 0) {
      throw new TetherError('ERR_PROTO_INVALID_OPTION', 'maxPayload must be a non-negative integer');
    }
    this.maxPayload = Math.min(opts.maxPayload, TWO_32 - 1);
    this.allowUnauthenticated = opts.allowUnauthenticated ?? false;
    this.preAuth = opts.handshake ?? false;
    if (opts.key !== undefined) this.setKey(opts.key);
  }

  /**
   * Handshake mode: the peer's AUTH checked out. Lifts the pre-authentication frame limit
   * and returns the messages that followed the AUTH in what was already pushed.
   */
  authenticated(): Message[] {
    this.preAuth = false;
    this.authSeen = false;
    return this.push(Buffer.alloc(0));
  }

  /** From now on every frame but AUTH must carry a valid MAC; seq restarts at 0. */
  setKey(key: Buffer): void {
    if (!Buffer.isBuffer(key) || key.length !== 32) {
      throw new TetherError('ERR_PROTO_INVALID_OPTION', 'key must be 32 bytes');
    }
    this.key = key;
    this.seq = 0;
  }

  get poisoned(): boolean {
    return this.poison !== null;
  }

  /** Bytes held but not yet decoded. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  push(chunk: Buffer): Message[] {
    if (this.poison !== null) {
      throw new TetherError('ERR_PROTO_POISONED', 'decoder saw a bad frame earlier', { cause: this.poison.code });
    }
    try {
      return this.drain(chunk);
    } catch (e) {
      this.poison = e instanceof TetherError ? e : new TetherError('ERR_PROTO_MALFORMED', 'decoder failure', { cause: String(e) });
      this.chunks = [];
      this.buffered = 0;
      this.pending = null;
      throw e;
    }
  }

  private drain(chunk: Buffer): Message[] {
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    const out: Message[] = [];
    for (;;) {
      if (this.preAuth && this.authSeen) return out;
      if (this.pending === null) {
        if (this.buffered < HEADER_SIZE) return out;
        this.pending = this.parseHeader(this.take(HEADER_SIZE));
      }
      const p = this.pending;
      const bodyLength = p.length + (p.mac ? MAC_SIZE : 0);
      if (this.buffered < bodyLength) return out;
      const payload = this.take(p.length);
      const mac = p.mac ? this.take(MAC_SIZE) : undefined;
      this.pending = null;
      const m = this.finishFrame(p, payload, mac);
      out.push(m);
      if (m.type === 'auth') this.authSeen = true;
    }
  }

  private parseHeader(header: Buffer): PendingFrame {
    if (!header.subarray(0, 4).equals(FRAME_MAGIC)) {
      throw new TetherError('ERR_PROTO_BAD_MAGIC', 'frame does not start with TTHR', {
        got: header.subarray(0, 4).toString('hex'),
      });
    }
    const version = header[4]!;
    if (version !== FRAME_VERSION) {
      throw new TetherError('ERR_PROTO_UNSUPPORTED_VERSION', `frame version ${version} unsupported`, { version });
    }
    const length = header.readUInt32BE(8);
    const max = this.preAuth ? Math.min(this.maxPayload, HANDSHAKE_MAX_PAYLOAD) : this.maxPayload;
    if (length > max) {
      throw new TetherError(
        'ERR_PROTO_FRAME_TOO_LARGE',
        `payload of ${length} bytes exceeds ${this.preAuth ? 'the pre-authentication limit' : 'maxPayload'}`,
        { length, maxPayload: max, ...(this.preAuth ? { preAuth: true } : {}) },
      );
    }
    const code = header[5]!;
    const type = TYPE_BY_CODE.get(code);
    if (type === undefined) {
      throw new TetherError('ERR_PROTO_UNKNOWN_TYPE', `unknown frame type 0x${code.toString(16)}`, { code });
    }
    const flags = header.readUInt16BE(6);
    if ((flags & ~FLAG_MAC) !== 0) throw malformed('reserved frame flags set', { flags });
    const mac = (flags & FLAG_MAC) !== 0;
    this.checkAuthentication(type, mac);
    return { type, header, length, mac };
  }

  /** Whether a frame of `type` may (or must) carry a MAC at this point of the session. */
  private checkAuthentication(type: MessageType, mac: boolean): void {
    if (isHandshake(type)) {
      if (mac) throw malformed(`${type} frames never carry a MAC`);
      if (type === 'hello' && this.key !== undefined) {
        throw new TetherError('ERR_PROTO_UNAUTHENTICATED', 'HELLO after the session key was set');
      }
    } else if (this.key !== undefined) {
      if (!mac) throw new TetherError('ERR_PROTO_UNAUTHENTICATED', `${type} frame without MAC`, { type });
    } else if (mac) {
      throw new TetherError('ERR_PROTO_UNAUTHENTICATED', `${type} frame with MAC before a session key`, { type });
    } else if (!this.allowUnauthenticated) {
      throw new TetherError('ERR_PROTO_UNAUTHENTICATED', `${type} frame before authentication`, { type });
    }
  }

  private finishFrame(p: PendingFrame, payload: Buffer, mac: Buffer | undefined): Message {
    const crc = crc32(payload, crc32(p.header.subarray(0, 12)));
    if (crc !== p.header.readUInt32BE(12)) {
      throw new TetherError('ERR_PROTO_BAD_CRC', `${p.type} frame CRC mismatch`, { type: p.type });
    }
    if (mac !== undefined) {
      // parseHeader guarantees a key whenever a MAC is present.
      const expected = frameMac(this.key!, this.seq, p.header, [payload]);
      if (!timingSafeEqual(expected, mac)) {
        throw new TetherError('ERR_PROTO_BAD_MAC', `${p.type} frame MAC mismatch`, { type: p.type, seq: this.seq });
      }
      this.seq++;
    }
    return decodePayload(p.type, payload);
  }

  /** Removes n buffered bytes; zero-copy when they lie in one chunk. */
  private take(n: number): Buffer {
    this.buffered -= n;
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first !== undefined && first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    return out;
  }
}
