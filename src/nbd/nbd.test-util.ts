/**
 * Client-side byte builders and a server-output reader for NBD tests: the bytes a
 * client sends, written out field by field from the spec, independent of the server code.
 */
import * as P from './protocol.ts';

export function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}

export function u64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

export function handle(n: number): Buffer {
  return u64(BigInt(n) * 0x0101n + 0xa5000000n);
}

/** C: 32 client flags */
export function clientFlags(flags = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES): Buffer {
  return u32(flags);
}

/** C: 64 IHAVEOPT, 32 option, 32 length, data */
export function option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([u64(P.IHAVEOPT), u32(opt), u32(data.length), data]);
}

/** OPT_INFO / OPT_GO data: 32 name length, name, 16 count, 16 x count info types. */
export function infoData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u16(infos.length), ...infos.map(u16)]);
}

export function optGo(name: string, infos: number[] = []): Buffer {
  return option(P.OPT_GO, infoData(name, infos));
}

export interface RequestFields {
  type: number;
  flags?: number;
  handle?: Buffer;
  offset?: bigint | number;
  length?: number;
}

/** C: 32 magic, 16 flags, 16 type, 64 handle, 64 offset, 32 length, [data] */
export function request(r: RequestFields, data: Buffer = Buffer.alloc(0), magic = P.REQUEST_MAGIC): Buffer {
  return Buffer.concat([
    u32(magic),
    u16(r.flags ?? 0),
    u16(r.type),
    r.handle ?? handle(1),
    u64(r.offset ?? 0),
    u32(r.length ?? data.length),
    data,
  ]);
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/** Splits server handshake output into option replies (after the 18-byte greeting). */
export function parseOptionReplies(bytes: Buffer): OptionReply[] {
  const out: OptionReply[] = [];
  let at = 0;
  while (at < bytes.length) {
    if (bytes.readBigUInt64BE(at) !== P.OPTION_REPLY_MAGIC) throw new Error(`no option reply magic at ${at}`);
    const len = bytes.readUInt32BE(at + 16);
    out.push({ option: bytes.readUInt32BE(at + 8), type: bytes.readUInt32BE(at + 12), data: bytes.subarray(at + 20, at + 20 + len) });
    at += 20 + len;
  }
  return out;
}

export interface SimpleReply {
  error: number;
  handle: Buffer;
}

export function parseSimpleReply(b: Buffer): SimpleReply {
  if (b.length < 16 || b.readUInt32BE(0) !== P.SIMPLE_REPLY_MAGIC) throw new Error('not a simple reply');
  return { error: b.readUInt32BE(4), handle: b.subarray(8, 16) };
}
