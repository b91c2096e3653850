/**
 * Frame codec for the checkpoint / peer channel. Pure: no sockets, no files.
 *
 * Wire facts (all integers big-endian):
 *
 *   frame   = header(16) ‖ payload(length) ‖ [mac(32) when flags.MAC]
 *   header  = 0  magic    "TTHR" (54 54 48 52)
 *             4  version  u8   = 1
 *             5  type     u8   (MESSAGE_TYPE_CODES below)
 *             6  flags    u16  bit 0 = MAC trailer present; other bits must be 0
 *             8  length   u32  payload bytes
 *             12 crc32    u32  CRC-32 (zlib) over header bytes 0..11 ‖ payload
 *   mac     = HMAC-SHA256(directionKey, seq u64 ‖ header(16) ‖ payload)
 *
 * Authentication: HELLO and AUTH never carry a MAC. Every other frame must carry one; the
 * decoder rejects it otherwise (unless constructed with allowUnauthenticated and no key).
 * `seq` counts authenticated frames per direction from 0 (the first frame sent after the
 * key is set has seq 0); the receiver tracks it itself, so a replayed, dropped or reordered
 * frame fails the MAC. Each direction has its own key (directionKeys), so a frame reflected
 * back to its sender fails the MAC too.
 *
 * Handshake (HELLO/AUTH, key derivation): src/peer/handshake.ts.
 *
 * Payloads (u64 values are < 2^53; ranges are checked):
 *   HELLO     0x01  role u8 (0 source, 1 destination) ‖ nonce(32)
 *   AUTH      0x02  mac(32)
 *   CONTROL   0x03  UTF-8 JSON object
 *   HASHES    0x04  startPfn u32 ‖ hashes (8 bytes per page)
 *   BEGIN     0x10  epoch u64
 *   PAGES     0x11  epoch u64 ‖ count u32 ‖ pfn u32 × count ‖ zero bitmap ⌈count/8⌉
 *                   (bit i = byte i>>3, bit i&7 LSB first; 1 = zero page; padding bits 0)
 *                   ‖ data (4096 × non-zero count, in pfn order)
 *   DISK      0x12  epoch u64 ‖ offset u64 ‖ data
 *   DISKZERO  0x15  epoch u64 ‖ offset u64 ‖ length u64  (exactly 24 bytes; 1 <= length <=
 *                   MAX_DISK_ZERO_BYTES: the range reads as zeroes once applied)
 *   DEVSTATE  0x13  epoch u64 ‖ data
 *   COMMIT    0x14  epoch u64 ‖ pages u32 ‖ diskBytes u64 ‖ devstateBytes u64 ‖ digest(32)
 *   ACK       0x20  epoch u64
 *   NACK      0x21  epoch u64 ‖ codeLength u16 ‖ code UTF-8 ‖ message UTF-8
 *   HEARTBEAT 0x30  epoch u64 ‖ sentAt f64 (finite)
 *   ABORT     0x3f  codeLength u16 ‖ code UTF-8 ‖ reason UTF-8
 * Every payload is canonical: decode(encode(m)) equals m and there is one encoding per message.
 */
import { createHash, createHmac, timingSafeEqual } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { TetherError } from '../errors.ts';
import { MAX_DISK_ZERO_BYTES, MAX_EPOCH, PAGE_SIZE, type DigestedMessage, type Message, type MessageType, type Role } from './messages.ts';

export const FRAME_MAGIC = Buffer.from('TTHR', 'latin1');
export const FRAME_VERSION = 1;
export const HEADER_SIZE = 16;
export const MAC_SIZE = 32;
export const NONCE_SIZE = 32;
export const DIGEST_SIZE = 32;
export const FLAG_MAC = 0x0001;
/** Smallest PSK accepted (matches the config contract: >= 32 bytes). */
export const MIN_PSK_SIZE = 32;
/**
 * Largest payload before authentication: the handshake's own messages, HELLO (role byte +
 * nonce, 33 bytes) and AUTH (the MAC, 32 bytes). A peer that has not proven the key can
 * make a decoder hold at most one header plus this (49 bytes), whatever length it announces.
 */
export const HANDSHAKE_MAX_PAYLOAD = Math.max(1 + NONCE_SIZE, MAC_SIZE);
/** Largest handshake frame (header + HELLO); one side's whole handshake is HELLO + AUTH, 97 bytes. */
export const HANDSHAKE_MAX_FRAME = HEADER_SIZE + HANDSHAKE_MAX_PAYLOAD;

export const MESSAGE_TYPE_CODES = {
  hello: 0x01,
  auth: 0x02,
  control: 0x03,
  hashes: 0x04,
  begin: 0x10,
  pages: 0x11,
  disk: 0x12,
  devstate: 0x13,
  commit: 0x14,
  diskzero: 0x15,
  ack: 0x20,
  nack: 0x21,
  heartbeat: 0x30,
  abort: 0x3f,
} as const satisfies Record<MessageType, number>;

const TYPE_BY_CODE = new Map<number, MessageType>(Object.entries(MESSAGE_TYPE_CODES).map(([name, code]) => [code, name as MessageType]));

export const ROLE_BYTE: Record<Role, number> = { source: 0, destination: 1 };
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const TWO_32 = 2 ** 32;

function isHandshake(type: MessageType): boolean {
  return type === 'hello' || type === 'auth';
}

// ---------------------------------------------------------------------------------------
// Encoding

function invalid(message: string, details?: Record<string, unknown>): TetherError {
  return new TetherError('ERR_PROTO_INVALID_MESSAGE', message, details);
}

function checkU64(name: string, n: number): void {
  if (!Number.isSafeInteger(n) || n < 0) throw invalid(`${name} must be an integer in [0, 2^53)`, { [name]: n });
}

function checkU32(name: string, n: number): void {
  if (!Number.isInteger(n) || n < 0 || n >= TWO_32) throw invalid(`${name} must be a u32`, { [name]: n });
}

function checkEpoch(epoch: number): void {
  if (!Number.isSafeInteger(epoch) || epoch < 0 || epoch > MAX_EPOCH) {
    throw invalid('epoch must be an integer in [0, 2^53)', { epoch });
  }
}

function checkSize(name: string, b: Buffer, size: number): void {
  if (!Buffer.isBuffer(b) || b.length !== size) throw invalid(`${name} must be ${size} bytes`);
}

function utf8(name: string, s: string): Buffer {
  if (typeof s !== 'string') throw invalid(`${name} must be a string`);
  const b = Buffer.from(s, 'utf8');
  // Lone surrogates would silently become U+FFFD; refuse them so decoding is exact.
  if (b.toString('utf8') !== s) throw invalid(`${name} must be well-formed Unicode`);
  return b;
}

function writeU64(buf: Buffer, n: number, offset: number): void {
  buf.writeUInt32BE(Math.floor(n / TWO_32), offset);
  buf.writeUInt32BE(n >>> 0, offset + 4);
}

function u64(n: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  writeU64(b, n, 0);
  return b;
}

function stringPair(name: string, first: string, second: string): Buffer[] {
  const a = utf8(`${name}.code`, first);
  if (a.length > 0xffff) throw invalid(`${name} code longer than 65535 bytes`);
  const len = Buffer.allocUnsafe(2);
  len.writeUInt16BE(a.length, 0);
  return [len, a, utf8(`${name}.text`, second)];
}

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

/**
 * The canonical payload of a message as a list of buffers (big data is not copied).
 * Throws ERR_PROTO_INVALID_MESSAGE for a message that cannot be encoded.
 */
export function payloadParts(msg: Message): Buffer[] {
  switch (msg.type) {
    case 'hello': {
      checkSize('hello.nonce', msg.nonce, NONCE_SIZE);
      const role = ROLE_BYTE[msg.role];
      if (role === undefined) throw invalid('hello.role must be source or destination');
      return [Buffer.from([role]), msg.nonce];
    }
    case 'auth':
      checkSize('auth.mac', msg.mac, MAC_SIZE);
      return [msg.mac];
    case 'control': {
      const body = msg.body as unknown;
      if (typeof body !== 'object' || body === null || Array.isArray(body)) {
        throw invalid('control.body must be a JSON object');
      }
      let json: string;
      try {
        json = JSON.stringify(body);
      } catch (e) {
        throw invalid('control.body is not serialisable as JSON', { cause: String(e) });
      }
      return [utf8('control.body', json)];
    }
    case 'hashes': {
      checkU32('hashes.startPfn', msg.startPfn);
      if (!Buffer.isBuffer(msg.hashes) || msg.hashes.length % 8 !== 0) {
        throw invalid('hashes.hashes must be a Buffer of 8 bytes per page');
      }
      if (msg.startPfn + msg.hashes.length / 8 > TWO_32) throw invalid('hashes run past pfn 2^32');
      const head = Buffer.allocUnsafe(4);
      head.writeUInt32BE(msg.startPfn, 0);
      return [head, msg.hashes];
    }
    case 'begin':
    case 'ack':
      checkEpoch(msg.epoch);
      return [u64(msg.epoch)];
    case 'pages': {
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
    case 'nack':
      checkEpoch(msg.epoch);
      return [u64(msg.epoch), ...stringPair('nack', msg.code, msg.message)];
    case 'heartbeat': {
      checkEpoch(msg.epoch);
      if (typeof msg.sentAt !== 'number' || !Number.isFinite(msg.sentAt)) {
        throw invalid('heartbeat.sentAt must be a finite number');
      }
      const b = Buffer.allocUnsafe(16);
      writeU64(b, msg.epoch, 0);
      b.writeDoubleBE(msg.sentAt, 8);
      return [b];
    }
    case 'abort':
      return stringPair('abort', msg.code, msg.reason);
    default: {
      const never: never = msg;
      throw invalid('unknown message type', { type: (never as { type: unknown }).type });
    }
  }
}

function seqBytes(seq: number | bigint): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(seq), 0);
  return b;
}

function frameMac(key: Buffer, seq: number | bigint, header: Buffer, payload: readonly Buffer[]): Buffer {
  const h = createHmac('sha256', key).update(seqBytes(seq)).update(header);
  for (const p of payload) h.update(p);
  return h.digest();
}

export interface FrameAuth {
  /** The sender's direction key (directionKeys(...).send). */
  key: Buffer;
  /** This direction's sequence number: 0 for the first authenticated frame (< 2^64). */
  seq: number | bigint;
}

/**
 * Encodes one frame as buffers suitable for writev (payload data is not copied).
 * HELLO and AUTH must be sent without `auth`; every other message with it (the decoder
 * enforces that).
 */
export function encode(msg: Message, auth?: FrameAuth): Buffer[] {
  const parts = payloadParts(msg);
  let length = 0;
  for (const p of parts) length += p.length;
  if (length >= TWO_32) throw new TetherError('ERR_PROTO_FRAME_TOO_LARGE', 'payload exceeds 2^32-1 bytes');
  if (auth !== undefined && isHandshake(msg.type)) throw invalid(`${msg.type} frames are never authenticated`);
  if (auth !== undefined) {
    const { seq } = auth;
    const ok = typeof seq === 'bigint' ? seq >= 0n && seq < 1n << 64n : Number.isSafeInteger(seq) && seq >= 0;
    if (!ok) throw invalid('seq must be an integer in [0, 2^64)', { seq: String(seq) });
  }

  const header = Buffer.allocUnsafe(HEADER_SIZE);
  FRAME_MAGIC.copy(header, 0);
  header[4] = FRAME_VERSION;
  header[5] = MESSAGE_TYPE_CODES[msg.type];
  header.writeUInt16BE(auth === undefined ? 0 : FLAG_MAC, 6);
  header.writeUInt32BE(length, 8);
  let crc = crc32(header.subarray(0, 12));
  for (const p of parts) crc = crc32(p, crc);
  header.writeUInt32BE(crc, 12);

  const out = [header, ...parts];
  if (auth !== undefined) out.push(frameMac(auth.key, auth.seq, header, parts));
  return out;
}

/** encode() joined into one Buffer (copies; for tests and small control frames). */
export function encodeToBuffer(msg: Message, auth?: FrameAuth): Buffer {
  return Buffer.concat(encode(msg, auth));
}

/** Encoder that keeps this direction's sequence number. */
export class Encoder {
  private key: Buffer | undefined;
  private seq = 0;

  constructor(opts: { key?: Buffer } = {}) {
    if (opts.key !== undefined) this.setKey(opts.key);
  }

  /** Every non-handshake frame encoded from now on carries a MAC; seq restarts at 0. */
  setKey(key: Buffer): void {
    checkSize('key', key, 32);
    this.key = key;
    this.seq = 0;
  }

  encode(msg: Message): Buffer[] {
    if (this.key === undefined || isHandshake(msg.type)) return encode(msg);
    const out = encode(msg, { key: this.key, seq: this.seq });
    this.seq++;
    return out;
  }
}

// ---------------------------------------------------------------------------------------
// Decoding

function malformed(message: string, details?: Record<string, unknown>): TetherError {
  return new TetherError('ERR_PROTO_MALFORMED', message, details);
}

class Reader {
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

/** Parses a payload whose frame already passed CRC and MAC checks. */
export function decodePayload(type: MessageType, payload: Buffer): Message {
  const r = new Reader(payload, type);
  let msg: Message;
  switch (type) {
    case 'hello': {
      const roleByte = r.u8();
      if (roleByte > 1) throw malformed('hello: unknown role', { role: roleByte });
      msg = { type, role: roleByte === 0 ? 'source' : 'destination', nonce: r.bytes(NONCE_SIZE) };
      break;
    }
    case 'auth':
      msg = { type, mac: r.bytes(MAC_SIZE) };
      break;
    case 'control': {
      const text = r.text(r.remaining());
      let body: unknown;
      try {
        body = JSON.parse(text);
      } catch {
        throw malformed('control: body is not JSON');
      }
      if (typeof body !== 'object' || body === null || Array.isArray(body)) {
        throw malformed('control: body is not a JSON object');
      }
      msg = { type, body: body as Record<string, unknown> };
      break;
    }
    case 'hashes': {
      const startPfn = r.u32();
      const hashes = r.rest();
      if (hashes.length % 8 !== 0) throw malformed('hashes: length not a multiple of 8');
      if (startPfn + hashes.length / 8 > TWO_32) throw malformed('hashes: run past pfn 2^32');
      msg = { type, startPfn, hashes };
      break;
    }
    case 'begin':
    case 'ack':
      msg = { type, epoch: r.u64() };
      break;
    case 'pages': {
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
      msg = { type, epoch, pfns, zero, data };
      break;
    }
    case 'disk': {
      const epoch = r.u64();
      const offset = r.u64();
      const data = r.rest();
      if (offset + data.length > Number.MAX_SAFE_INTEGER) throw malformed('disk: extent ends past 2^53');
      msg = { type, epoch, offset, data };
      break;
    }
    case 'diskzero': {
      const epoch = r.u64();
      const offset = r.u64();
      const length = r.u64();
      if (length < 1 || length > MAX_DISK_ZERO_BYTES) {
        throw malformed(`diskzero: length ${length} outside [1, ${MAX_DISK_ZERO_BYTES}]`, { length });
      }
      if (offset + length > Number.MAX_SAFE_INTEGER) throw malformed('diskzero: extent ends past 2^53');
      msg = { type, epoch, offset, length };
      break;
    }
    case 'devstate':
      msg = { type, epoch: r.u64(), data: r.rest() };
      break;
    case 'commit':
      msg = {
        type,
        epoch: r.u64(),
        pages: r.u32(),
        diskBytes: r.u64(),
        devstateBytes: r.u64(),
        digest: r.bytes(DIGEST_SIZE),
      };
      break;
    case 'nack': {
      const epoch = r.u64();
      const code = r.text(r.u16());
      msg = { type, epoch, code, message: r.text(r.remaining()) };
      break;
    }
    case 'heartbeat': {
      const epoch = r.u64();
      const sentAt = r.f64();
      if (!Number.isFinite(sentAt)) throw malformed('heartbeat: sentAt not finite');
      msg = { type, epoch, sentAt };
      break;
    }
    case 'abort': {
      const code = r.text(r.u16());
      msg = { type, code, reason: r.text(r.remaining()) };
      break;
    }
  }
  r.end();
  return msg;
}

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
    return { type, header, length, mac };
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

// ---------------------------------------------------------------------------------------
// Checkpoint digest

/** COMMIT.digest: SHA-256 over type u8 ‖ length u32 ‖ payload of each digested message. */
export class CheckpointDigest {
  private readonly hash = createHash('sha256');

  /** Adds one PAGES/DISK/DEVSTATE message; returns its payload length. */
  update(msg: DigestedMessage): number {
    const parts = payloadParts(msg);
    let length = 0;
    for (const p of parts) length += p.length;
    const prefix = Buffer.allocUnsafe(5);
    prefix[0] = MESSAGE_TYPE_CODES[msg.type];
    prefix.writeUInt32BE(length, 1);
    this.hash.update(prefix);
    for (const p of parts) this.hash.update(p);
    return length;
  }

  digest(): Buffer {
    return this.hash.digest();
  }
}
