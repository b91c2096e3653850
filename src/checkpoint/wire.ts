/**
 * Byte-level pieces the payload codecs of the peer channel share (checkpoint content here in
 * codec.ts, the peer's own messages in src/peer/codec.ts): big-endian integers below 2^53,
 * range checks that throw ERR_PROTO_INVALID_MESSAGE while encoding, and a bounds-checked
 * Reader that throws ERR_PROTO_MALFORMED while decoding. Pure.
 */
import { TetherError } from '../errors.ts';
import { MAX_EPOCH } from './messages.ts';

export const TWO_32 = 2 ** 32;
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** A message that cannot be encoded exactly. */
export function invalid(message: string, details?: Record<string, unknown>): TetherError {
  return new TetherError('ERR_PROTO_INVALID_MESSAGE', message, details);
}

/** A payload that does not decode. */
export function malformed(message: string, details?: Record<string, unknown>): TetherError {
  return new TetherError('ERR_PROTO_MALFORMED', message, details);
}

export function checkU64(name: string, n: number): void {
  if (!Number.isSafeInteger(n) || n < 0) throw invalid(`${name} must be an integer in [0, 2^53)`, { [name]: n });
}

export function checkU32(name: string, n: number): void {
  if (!Number.isInteger(n) || n < 0 || n >= TWO_32) throw invalid(`${name} must be a u32`, { [name]: n });
}

export function checkEpoch(epoch: number): void {
  if (!Number.isSafeInteger(epoch) || epoch < 0 || epoch > MAX_EPOCH) {
    throw invalid('epoch must be an integer in [0, 2^53)', { epoch });
  }
}

export function checkSize(name: string, b: Buffer, size: number): void {
  if (!Buffer.isBuffer(b) || b.length !== size) throw invalid(`${name} must be ${size} bytes`);
}

/** UTF-8 bytes of a well-formed string (lone surrogates refused, so decoding is exact). */
export function utf8(name: string, s: string): Buffer {
  if (typeof s !== 'string') throw invalid(`${name} must be a string`);
  const b = Buffer.from(s, 'utf8');
  // Lone surrogates would silently become U+FFFD; refuse them so decoding is exact.
  if (b.toString('utf8') !== s) throw invalid(`${name} must be well-formed Unicode`);
  return b;
}

export function writeU64(buf: Buffer, n: number, offset: number): void {
  buf.writeUInt32BE(Math.floor(n / TWO_32), offset);
  buf.writeUInt32BE(n >>> 0, offset + 4);
}

export function u64(n: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  writeU64(b, n, 0);
  return b;
}

/** Reads a payload front to back; every read is bounds-checked. */
export class Reader {
  private off = 0;
  constructor(
    private readonly buf: Buffer,
    private readonly what: string,
  ) {}

  private need(n: number): void {
    if (this.buf.length - this.off < n) {
      throw malformed(`${this.what}: payload too short`, { need: n, have: this.buf.length - this.off });
    }
  }
  u8(): number {
    this.need(1);
    return this.buf[this.off++]!;
  }
  u16(): number {
    this.need(2);
    const v = this.buf.readUInt16BE(this.off);
    this.off += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.buf.readUInt32BE(this.off);
    this.off += 4;
    return v;
  }
  u64(): number {
    this.need(8);
    const hi = this.buf.readUInt32BE(this.off);
    const lo = this.buf.readUInt32BE(this.off + 4);
    if (hi >= 2 ** 21) throw malformed(`${this.what}: u64 value >= 2^53`);
    this.off += 8;
    return hi * TWO_32 + lo;
  }
  f64(): number {
    this.need(8);
    const v = this.buf.readDoubleBE(this.off);
    this.off += 8;
    return v;
  }
  bytes(n: number): Buffer {
    this.need(n);
    const b = this.buf.subarray(this.off, this.off + n);
    this.off += n;
    return b;
  }
  rest(): Buffer {
    return this.bytes(this.buf.length - this.off);
  }
  remaining(): number {
    return this.buf.length - this.off;
  }
  end(): void {
    if (this.off !== this.buf.length) {
      throw malformed(`${this.what}: ${this.buf.length - this.off} trailing payload bytes`);
    }
  }
  text(n: number): string {
    const b = this.bytes(n);
    try {
      return UTF8.decode(b);
    } catch {
      throw malformed(`${this.what}: invalid UTF-8`);
    }
  }
}
