/**
 * Frame codec of the peer channel: the frame around every message, and the payloads of the
 * channel's own messages. Pure: no sockets, no files. Checkpoint content payloads are
 * src/checkpoint/codec.ts; the incremental decoder is decoder.ts.
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
 * Handshake (HELLO/AUTH, key derivation): handshake.ts.
 *
 * Payloads (u64 values are < 2^53; ranges are checked):
 *   HELLO     0x01  role u8 (0 source, 1 destination) ‖ nonce(32)
 *   AUTH      0x02  mac(32)
 *   CONTROL   0x03  UTF-8 JSON object
 *   HASHES    0x04  startPfn u32 ‖ hashes (8 bytes per page)
 *   BEGIN … COMMIT 0x10–0x15: checkpoint content, src/checkpoint/codec.ts
 *   ACK       0x20  epoch u64
 *   NACK      0x21  epoch u64 ‖ codeLength u16 ‖ code UTF-8 ‖ message UTF-8
 *   HEARTBEAT 0x30  epoch u64 ‖ sentAt f64 (finite)
 *   ABORT     0x3f  codeLength u16 ‖ code UTF-8 ‖ reason UTF-8
 * Every payload is canonical: decode(encode(m)) equals m and there is one encoding per message.
 */
import { createHmac } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { CHECKPOINT_TYPE_CODES, checkpointPayloadParts, readCheckpointPayload } from '../checkpoint/codec.ts';
import { checkEpoch, checkSize, checkU32, invalid, malformed, Reader, TWO_32, u64, utf8, writeU64 } from '../checkpoint/wire.ts';
import { TetherError } from '../errors.ts';
import type { Message, MessageType, PeerMessage, PeerMessageType, Role } from './messages.ts';

export const FRAME_MAGIC = Buffer.from('TTHR', 'latin1');
export const FRAME_VERSION = 1;
export const HEADER_SIZE = 16;
export const MAC_SIZE = 32;
export const NONCE_SIZE = 32;
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

const PEER_TYPE_CODES = {
  hello: 0x01,
  auth: 0x02,
  control: 0x03,
  hashes: 0x04,
  ack: 0x20,
  nack: 0x21,
  heartbeat: 0x30,
  abort: 0x3f,
} as const satisfies Record<PeerMessageType, number>;

export const MESSAGE_TYPE_CODES = { ...PEER_TYPE_CODES, ...CHECKPOINT_TYPE_CODES } as const satisfies Record<MessageType, number>;

export const TYPE_BY_CODE = new Map<number, MessageType>(
  Object.entries(MESSAGE_TYPE_CODES).map(([name, code]) => [code, name as MessageType]),
);

export const ROLE_BYTE: Record<Role, number> = { source: 0, destination: 1 };

const isPeerType = (type: MessageType): type is PeerMessageType => Object.hasOwn(PEER_TYPE_CODES, type);

export function isHandshake(type: MessageType): boolean {
  return type === 'hello' || type === 'auth';
}

// ---------------------------------------------------------------------------------------
// Payloads of the channel's own messages

function stringPair(name: string, first: string, second: string): Buffer[] {
  const a = utf8(`${name}.code`, first);
  if (a.length > 0xffff) throw invalid(`${name} code longer than 65535 bytes`);
  const len = Buffer.allocUnsafe(2);
  len.writeUInt16BE(a.length, 0);
  return [len, a, utf8(`${name}.text`, second)];
}

function controlParts(body: unknown): Buffer[] {
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

function peerPayloadParts(msg: PeerMessage): Buffer[] {
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
    case 'control':
      return controlParts(msg.body);
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
    case 'ack':
      checkEpoch(msg.epoch);
      return [u64(msg.epoch)];
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

/**
 * The canonical payload of a message as a list of buffers (big data is not copied).
 * Throws ERR_PROTO_INVALID_MESSAGE for a message that cannot be encoded.
 */
export function payloadParts(msg: Message): Buffer[] {
  if (msg === null || typeof msg !== 'object' || !Object.hasOwn(MESSAGE_TYPE_CODES, msg.type)) {
    throw invalid('unknown message type', { type: (msg as { type?: unknown } | null)?.type });
  }
  return isPeerType(msg.type) ? peerPayloadParts(msg as PeerMessage) : checkpointPayloadParts(msg as Exclude<Message, PeerMessage>);
}

function readPeerPayload(type: PeerMessageType, r: Reader): PeerMessage {
  switch (type) {
    case 'hello': {
      const roleByte = r.u8();
      if (roleByte > 1) throw malformed('hello: unknown role', { role: roleByte });
      return { type, role: roleByte === 0 ? 'source' : 'destination', nonce: r.bytes(NONCE_SIZE) };
    }
    case 'auth':
      return { type, mac: r.bytes(MAC_SIZE) };
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
      return { type, body: body as Record<string, unknown> };
    }
    case 'hashes': {
      const startPfn = r.u32();
      const hashes = r.rest();
      if (hashes.length % 8 !== 0) throw malformed('hashes: length not a multiple of 8');
      if (startPfn + hashes.length / 8 > TWO_32) throw malformed('hashes: run past pfn 2^32');
      return { type, startPfn, hashes };
    }
    case 'ack':
      return { type, epoch: r.u64() };
    case 'nack': {
      const epoch = r.u64();
      const code = r.text(r.u16());
      return { type, epoch, code, message: r.text(r.remaining()) };
    }
    case 'heartbeat': {
      const epoch = r.u64();
      const sentAt = r.f64();
      if (!Number.isFinite(sentAt)) throw malformed('heartbeat: sentAt not finite');
      return { type, epoch, sentAt };
    }
    case 'abort': {
      const code = r.text(r.u16());
      return { type, code, reason: r.text(r.remaining()) };
    }
  }
}

/** Parses a payload whose frame already passed CRC and MAC checks. */
export function decodePayload(type: MessageType, payload: Buffer): Message {
  const r = new Reader(payload, type);
  const msg = isPeerType(type) ? readPeerPayload(type, r) : readCheckpointPayload(type, r);
  r.end();
  return msg;
}

// ---------------------------------------------------------------------------------------
// Frames

function seqBytes(seq: number | bigint): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(seq), 0);
  return b;
}

export function frameMac(key: Buffer, seq: number | bigint, header: Buffer, payload: readonly Buffer[]): Buffer {
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
