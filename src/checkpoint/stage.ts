/**
 * The stage file: a verified checkpoint persisted on S before any of it is applied, so that
 * a sidecar that dies mid-apply can re-apply it on restart. Pure codec (store.ts does I/O).
 *
 * Disk facts (all integers big-endian):
 *   0    magic        "TTSG"
 *   4    version      u16 = 2 (1 is still read: its disk table has no kind, every extent holds data)
 *   6    flags        u16 = 0
 *   8    epoch        u64
 *   16   pageCount    u32
 *   20   diskCount    u32
 *   24   6 × { length u64, crc32 u32 }   one per section, in section order
 *   96   headerCrc    u32  CRC-32 over bytes 0..95
 *   100  sections:    pfns        u32 × pageCount
 *                     zeroMask    u8 × pageCount (1 = zero page)
 *                     pageData    4096 × non-zero pages
 *                     diskTable   { offset u64, length u64, kind u32 } × diskCount
 *                                 (kind 0: data, 1: zeroes, no data; version 1: 16-byte
 *                                 entries without kind, all data)
 *                     diskData    data extents' bytes, concatenated in table order
 *                     devstate
 *   end-4 fileCrc    u32  CRC-32 over every byte before it
 */
import { crc32 } from 'node:zlib';
import { TetherError } from '../errors.ts';
import type { ErrorCode } from '../errors.ts';
import type { DiskExtent } from '../epoch/outputs.ts';
import type { Checkpoint } from './assembler.ts';
import { MAX_DISK_ZERO_BYTES, PAGE_SIZE } from './messages.ts';

export const STAGE_MAGIC = Buffer.from('TTSG', 'latin1');
export const STAGE_VERSION = 2;
const ENTRY_V1 = 16;
const ENTRY = 20;
const KIND_DATA = 0;
const KIND_ZERO = 1;
const SECTIONS = 6;
export const STAGE_HEADER_SIZE = 100;
const TWO_32 = 2 ** 32;

function writeU64(buf: Buffer, n: number, off: number): void {
  buf.writeUInt32BE(Math.floor(n / TWO_32), off);
  buf.writeUInt32BE(n >>> 0, off + 4);
}

function readU64(buf: Buffer, off: number): number {
  const hi = buf.readUInt32BE(off);
  if (hi >= 2 ** 21) throw stageError('ERR_STAGE_MALFORMED', 'u64 field >= 2^53');
  return hi * TWO_32 + buf.readUInt32BE(off + 4);
}

function stageError(code: ErrorCode, message: string, details?: Record<string, unknown>): TetherError {
  return new TetherError(code, message, details);
}

/** Encodes a checkpoint as stage-file buffers (page data and extents are not copied). */
export function encodeStage(ckpt: Checkpoint): Buffer[] {
  const n = ckpt.pfns.length;
  const pfns = Buffer.allocUnsafe(4 * n);
  for (let i = 0; i < n; i++) pfns.writeUInt32BE(ckpt.pfns[i]!, 4 * i);
  const zeroMask = Buffer.from(ckpt.zeroMask.buffer, ckpt.zeroMask.byteOffset, ckpt.zeroMask.byteLength);
  const table = Buffer.allocUnsafe(ENTRY * ckpt.disk.length);
  const diskData: Buffer[] = [];
  ckpt.disk.forEach((d, i) => {
    writeU64(table, d.offset, ENTRY * i);
    writeU64(table, d.zero ? d.length : d.data.length, ENTRY * i + 8);
    table.writeUInt32BE(d.zero ? KIND_ZERO : KIND_DATA, ENTRY * i + 16);
    if (!d.zero) diskData.push(d.data);
  });
  const sections: Buffer[][] = [[pfns], [zeroMask], [ckpt.data], [table], diskData, [ckpt.devstate]];

  const header = Buffer.alloc(STAGE_HEADER_SIZE);
  STAGE_MAGIC.copy(header, 0);
  header.writeUInt16BE(STAGE_VERSION, 4);
  header.writeUInt16BE(0, 6);
  writeU64(header, ckpt.epoch, 8);
  header.writeUInt32BE(n, 16);
  header.writeUInt32BE(ckpt.disk.length, 20);
  sections.forEach((parts, i) => {
    let length = 0;
    let crc = 0;
    for (const p of parts) {
      length += p.length;
      crc = crc32(p, crc);
    }
    writeU64(header, length, 24 + 12 * i);
    header.writeUInt32BE(crc, 24 + 12 * i + 8);
  });
  header.writeUInt32BE(crc32(header.subarray(0, 96)), 96);

  const out = [header, ...sections.flat().filter((b) => b.length > 0)];
  let fileCrc = 0;
  for (const b of out) fileCrc = crc32(b, fileCrc);
  const trailer = Buffer.allocUnsafe(4);
  trailer.writeUInt32BE(fileCrc, 0);
  out.push(trailer);
  return out;
}

/**
 * Decodes and verifies a whole stage file. Throws ERR_STAGE_TRUNCATED, ERR_STAGE_BAD_MAGIC,
 * ERR_STAGE_UNSUPPORTED_VERSION, ERR_STAGE_BAD_CRC or ERR_STAGE_MALFORMED.
 * The returned checkpoint's buffers share memory with `file`.
 */
export function decodeStage(file: Buffer): Checkpoint {
  if (file.length < STAGE_HEADER_SIZE + 4) {
    throw stageError('ERR_STAGE_TRUNCATED', `stage file of ${file.length} bytes is shorter than its header`);
  }
  if (!file.subarray(0, 4).equals(STAGE_MAGIC)) throw stageError('ERR_STAGE_BAD_MAGIC', 'stage file magic is not TTSG');
  const version = file.readUInt16BE(4);
  if (version !== STAGE_VERSION && version !== 1) {
    throw stageError('ERR_STAGE_UNSUPPORTED_VERSION', `stage file version ${version} unsupported`, { version });
  }
  if (crc32(file.subarray(0, 96)) !== file.readUInt32BE(96)) {
    throw stageError('ERR_STAGE_BAD_CRC', 'stage header CRC mismatch');
  }
  if (file.readUInt16BE(6) !== 0) throw stageError('ERR_STAGE_MALFORMED', 'stage flags set');
  const epoch = readU64(file, 8);
  const n = file.readUInt32BE(16);
  const diskCount = file.readUInt32BE(20);
  const lengths: number[] = [];
  const crcs: number[] = [];
  let total = STAGE_HEADER_SIZE + 4;
  for (let i = 0; i < SECTIONS; i++) {
    const length = readU64(file, 24 + 12 * i);
    lengths.push(length);
    crcs.push(file.readUInt32BE(24 + 12 * i + 8));
    total += length;
  }
  if (file.length < total) {
    throw stageError('ERR_STAGE_TRUNCATED', `stage file has ${file.length} of ${total} bytes`);
  }
  if (file.length > total) throw stageError('ERR_STAGE_MALFORMED', `stage file has ${file.length - total} extra bytes`);
  if (crc32(file.subarray(0, total - 4)) !== file.readUInt32BE(total - 4)) {
    throw stageError('ERR_STAGE_BAD_CRC', 'stage file CRC mismatch');
  }
  const sections: Buffer[] = [];
  let off = STAGE_HEADER_SIZE;
  for (let i = 0; i < SECTIONS; i++) {
    const s = file.subarray(off, off + lengths[i]!);
    if (crc32(s) !== crcs[i]) throw stageError('ERR_STAGE_BAD_CRC', `stage section ${i} CRC mismatch`);
    sections.push(s);
    off += s.length;
  }
  const [pfnBytes, zeroBytes, data, table, diskData, devstate] = sections as [Buffer, Buffer, Buffer, Buffer, Buffer, Buffer];

  if (pfnBytes.length !== 4 * n || zeroBytes.length !== n) {
    throw stageError('ERR_STAGE_MALFORMED', 'stage page sections do not match pageCount');
  }
  const pfns = new Uint32Array(n);
  for (let i = 0; i < n; i++) pfns[i] = pfnBytes.readUInt32BE(4 * i);
  const zeroMask = new Uint8Array(n);
  let nonZero = 0;
  for (let i = 0; i < n; i++) {
    const z = zeroBytes[i]!;
    if (z > 1) throw stageError('ERR_STAGE_MALFORMED', 'stage zero mask entry not 0/1');
    zeroMask[i] = z;
    if (z === 0) nonZero++;
  }
  if (data.length !== nonZero * PAGE_SIZE) throw stageError('ERR_STAGE_MALFORMED', 'stage page data length mismatch');
  const entry = version === 1 ? ENTRY_V1 : ENTRY;
  if (table.length !== entry * diskCount) throw stageError('ERR_STAGE_MALFORMED', 'stage disk table length mismatch');
  const disk: DiskExtent[] = [];
  let diskOff = 0;
  for (let i = 0; i < diskCount; i++) {
    const offset = readU64(table, entry * i);
    const length = readU64(table, entry * i + 8);
    const kind = version === 1 ? KIND_DATA : table.readUInt32BE(entry * i + 16);
    if (kind === KIND_ZERO) {
      if (length < 1 || length > MAX_DISK_ZERO_BYTES || offset + length > Number.MAX_SAFE_INTEGER) {
        throw stageError('ERR_STAGE_MALFORMED', `stage zero extent of ${length} bytes out of bounds`);
      }
      disk.push({ offset, length, zero: true });
      continue;
    }
    if (kind !== KIND_DATA) throw stageError('ERR_STAGE_MALFORMED', `stage disk extent kind ${kind} unknown`);
    if (diskOff + length > diskData.length) throw stageError('ERR_STAGE_MALFORMED', 'stage disk extents overrun');
    disk.push({ offset, data: diskData.subarray(diskOff, diskOff + length) });
    diskOff += length;
  }
  if (diskOff !== diskData.length) throw stageError('ERR_STAGE_MALFORMED', 'stage disk data length mismatch');
  return { epoch, pfns, zeroMask, data, disk, devstate };
}
