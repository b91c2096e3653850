/**
 * The destination journal's write-ahead log: record format, segment files and names. The
 * layout and the segment rules are described at the top of journal-log.ts (the writer);
 * journal-replay.ts reads a log back.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import zlib from 'node:zlib';

export const LOG_MAGIC = 0x54574c31; // 'TWL1'
export const LOG_HEADER_BYTES = 40;
/**
 * Largest record appended synchronously on the event loop (writeNow): a page-cache
 * copy of this size takes some tens of microseconds, cheaper than a thread-pool trip.
 */
export const SYNC_APPEND_MAX_BYTES = 256 * 1024;
/** Largest write record accepted on replay (an NBD write is at most 32 MiB). */
export const MAX_RECORD_DATA = 64 * 1024 * 1024;

export const LogKind = { Open: 0, Write: 1, Zeroes: 2, Completed: 3 } as const;
export type LogKind = (typeof LogKind)[keyof typeof LogKind];

export interface LogMeta {
  vm: string;
  migrationId: string;
  /** Disk size in bytes: a log of another disk is refused. */
  size: number;
}

/** A segment's open record: the log's metadata, the segment's number and the first epoch it may hold. */
export interface SegmentMeta extends LogMeta {
  segment?: number;
  firstEpoch?: number;
}

/** The file of segment `n` of the log named `file` (segment 0 is `file` itself). */
export function segmentFile(file: string, n: number): string {
  return n === 0 ? file : `${file}.${n}`;
}

/** The segments of the log named `file` that exist, in order: [number, path]. */
export async function logSegments(file: string): Promise<[number, string][]> {
  const base = path.basename(file);
  let names: string[];
  try {
    names = await fsp.readdir(path.dirname(file));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  const out: [number, string][] = [];
  for (const n of names) {
    if (n === base) out.push([0, file]);
    else if (n.startsWith(`${base}.`) && /^[1-9]\d{0,8}$/.test(n.slice(base.length + 1)))
      out.push([Number(n.slice(base.length + 1)), path.join(path.dirname(file), n)]);
  }
  return out.sort((a, b) => a[0] - b[0]);
}

/** Delete every segment of the log named `file`. */
export async function removeJournalLog(file: string): Promise<void> {
  for (const [, f] of await logSegments(file)) await fsp.rm(f, { force: true });
}

export type LogRecord =
  | { kind: typeof LogKind.Write; epoch: number; offset: number; data: Buffer }
  | { kind: typeof LogKind.Zeroes; epoch: number; offset: number; length: number }
  | { kind: typeof LogKind.Completed; epoch: number };

/** The log file of a VM's migration. */
export function journalLogPath(dir: string, vm: string, migrationId: string): string {
  return path.join(dir, `${vm}.${migrationId}.wal`);
}

/**
 * Every log of `vm` in `dir` (normally none or one), each named by its segment 0's path
 * (`<vm>.<migration>.wal`), also when only later segments are left.
 */
export async function findJournalLogs(dir: string, vm: string): Promise<string[]> {
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  const logs = new Set<string>();
  for (const n of names) {
    const m = /^(.*\.wal)(?:\.[1-9]\d{0,8})?$/.exec(n);
    if (m && n.startsWith(`${vm}.`)) logs.add(path.join(dir, m[1]!));
  }
  return [...logs].sort();
}

function header(kind: LogKind, epoch: number, offset: number, length: number, dataLen: number): Buffer {
  const h = Buffer.alloc(LOG_HEADER_BYTES);
  h.writeUInt32LE(LOG_MAGIC, 4);
  h.writeUInt32LE(LOG_HEADER_BYTES + dataLen, 8);
  h.writeUInt8(kind, 12);
  h.writeUInt32LE(epoch, 16);
  h.writeBigUInt64LE(BigInt(offset), 24);
  h.writeBigUInt64LE(BigInt(length), 32);
  return h;
}

/** The record's buffers (header first; `data` is not copied), checksum filled in. */
export function encodeRecord(kind: LogKind, epoch: number, offset: number, length: number, data?: Buffer): Buffer[] {
  const h = header(kind, epoch, offset, length, data?.length ?? 0);
  let crc = zlib.crc32(h.subarray(4));
  if (data) crc = zlib.crc32(data, crc);
  h.writeUInt32LE(crc >>> 0, 0);
  return data ? [h, data] : [h];
}
