/**
 * Reading the destination journal's write-ahead log back (a restarted sidecar): every
 * segment in order, a torn tail of the last one ignored (format: journal-log.ts).
 */
import fsp from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import zlib from 'node:zlib';
import { TetherError } from '../errors.ts';
import {
  LOG_HEADER_BYTES,
  LOG_MAGIC,
  LogKind,
  MAX_RECORD_DATA,
  logSegments,
  type LogMeta,
  type LogRecord,
  type SegmentMeta,
} from './journal-format.ts';

export interface Replay {
  meta: LogMeta;
  records: LogRecord[];
  /** The segments read, in order, with the first epoch each can hold; the log ends in the last one. */
  segments: { n: number; firstEpoch: number }[];
  /**
   * Segments after a closed one that ends torn (a power loss before any FLUSH synced it):
   * never read, their writes covered by no FLUSH; reopen() deletes them.
   */
  beyondTear: number[];
  /** End of the last good record of the last segment read: reopen() cuts that file here. */
  validEnd: number;
  /** Bytes after validEnd that were ignored (a torn or corrupt tail). */
  ignoredBytes: number;
  /** The final epoch of a `completed` record, or null. */
  completed: number | null;
}

/**
 * Reads a log, every segment in order. A record that is short, fails its checksum or is
 * malformed ends the replay (a torn tail), also in a closed segment: only a power loss
 * tears one, and then no FLUSH synced it since it was closed (sync() syncs the closed ones
 * first), so no later write was promised durable; the segments after it are `beyondTear`.
 * A gap in the segment numbers, or a segment whose open record (durable before the
 * segment got a record) is unreadable or of another log, is ERR_JOURNAL_LOG. Records of
 * epochs <= `afterEpoch` are skipped (their data is not kept): the source holds them.
 */
export async function replayJournalLog(file: string, afterEpoch = 0): Promise<Replay> {
  const found = await logSegments(file);
  if (found.length === 0) throw new TetherError('ERR_JOURNAL_LOG', `journal log ${file} has no segment`);
  const out: Replay = {
    meta: null as unknown as LogMeta,
    records: [],
    segments: [],
    beyondTear: [],
    validEnd: 0,
    ignoredBytes: 0,
    completed: null,
  };
  for (let i = 0; i < found.length; i++) {
    const [n, f] = found[i]!;
    if (i > 0 && n !== found[i - 1]![0] + 1)
      throw new TetherError('ERR_JOURNAL_LOG', `journal log ${file}: segment ${found[i - 1]![0] + 1} is missing before ${n}`);
    const seg = await replaySegment(f, afterEpoch, out.records);
    const m = seg.meta;
    if (
      !m ||
      (m.segment ?? 0) !== n ||
      (i > 0 && (m.migrationId !== out.meta.migrationId || m.vm !== out.meta.vm || m.size !== out.meta.size))
    )
      throw new TetherError('ERR_JOURNAL_LOG', `journal log ${f} has no readable open record of segment ${n} of this log`);
    if (i === 0) out.meta = { vm: m.vm, migrationId: m.migrationId, size: m.size };
    out.segments.push({ n, firstEpoch: m.firstEpoch ?? 1 });
    out.validEnd = seg.validEnd;
    out.ignoredBytes = seg.ignoredBytes;
    out.completed = seg.completed ?? out.completed;
    if (seg.ignoredBytes > 0 && i < found.length - 1) {
      out.beyondTear = found.slice(i + 1).map(([k]) => k);
      break;
    }
  }
  return out;
}

/** One segment's records (appended to `records`), its open record's metadata (null: unreadable). */
async function replaySegment(
  file: string,
  afterEpoch: number,
  records: LogRecord[],
): Promise<{ meta: SegmentMeta | null; validEnd: number; ignoredBytes: number; completed: number | null }> {
  const fh = await fsp.open(file, 'r');
  try {
    const { size } = await fh.stat();
    let meta: SegmentMeta | null = null;
    let completed: number | null = null;
    let pos = 0;
    const h = Buffer.alloc(LOG_HEADER_BYTES);
    for (;;) {
      if (pos + LOG_HEADER_BYTES > size) break;
      await readFull(fh, h, pos);
      const len = h.readUInt32LE(8);
      const kind = h.readUInt8(12);
      const dataLen = len - LOG_HEADER_BYTES;
      if (h.readUInt32LE(4) !== LOG_MAGIC || len < LOG_HEADER_BYTES || dataLen > MAX_RECORD_DATA || pos + len > size) break;
      const data = Buffer.alloc(dataLen);
      if (dataLen > 0) await readFull(fh, data, pos + LOG_HEADER_BYTES);
      let crc = zlib.crc32(h.subarray(4));
      crc = zlib.crc32(data, crc);
      if (crc >>> 0 !== h.readUInt32LE(0)) break;
      const epoch = h.readUInt32LE(16);
      const offset = Number(h.readBigUInt64LE(24));
      const length = Number(h.readBigUInt64LE(32));
      if (pos === 0) {
        if (kind !== LogKind.Open) break;
        try {
          meta = JSON.parse(data.toString('utf8')) as SegmentMeta;
        } catch {
          break;
        }
      } else if (kind === LogKind.Write) {
        if (length !== dataLen) break;
        if (epoch > afterEpoch) records.push({ kind: LogKind.Write, epoch, offset, data });
      } else if (kind === LogKind.Zeroes) {
        if (dataLen !== 0) break;
        if (epoch > afterEpoch) records.push({ kind: LogKind.Zeroes, epoch, offset, length });
      } else if (kind === LogKind.Completed) {
        completed = epoch;
        records.push({ kind: LogKind.Completed, epoch });
      } else break;
      pos += len;
    }
    return { meta, validEnd: pos, ignoredBytes: size - pos, completed };
  } finally {
    await fh.close();
  }
}

async function readFull(fh: FileHandle, buf: Buffer, pos: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, pos + done);
    if (bytesRead === 0) throw new TetherError('ERR_JOURNAL_LOG', 'journal log shrank while being read');
    done += bytesRead;
  }
}
