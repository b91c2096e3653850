/**
 * The block-write journal's write-ahead log: what makes a journaled guest write
 * survive the destination sidecar.
 *
 * One append-only file per VM per migration (`<journalDir>/<vm>.<migrationId>.wal`).
 * Every record is length-framed and checksummed:
 *
 *   0  u32 crc32 of bytes 4..end (header rest + data)
 *   4  u32 magic 'TWL1'
 *   8  u32 record length (header + data)
 *   12 u8  kind: 0 open (data: JSON metadata), 1 write (data: the bytes),
 *          2 zeroes (TRIM / WRITE_ZEROES: no data), 3 completed (epoch: the final one)
 *   13 3 bytes zero
 *   16 u32 epoch
 *   20 u32 zero
 *   24 u64 offset
 *   32 u64 length (of the guest range; for a write also of the data)
 *   40 data
 *
 * Appends are written in call order by one writer (group commit: what queued while a
 * write was under way goes in the next writev). A record counts once its write()
 * returned: it is in the page cache and survives the sidecar process (kill -9); sync()
 * adds fdatasync for FLUSH and FUA. Replay reads records up to the first one that is
 * short, fails its checksum or is malformed: a torn tail (the sidecar died mid-append)
 * is ignored. Everything before it was acknowledged to the guest only after its
 * record was written, so nothing acknowledged is lost.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { FileHandle } from 'node:fs/promises';
import zlib from 'node:zlib';
import { TetherError } from '../errors.ts';

export const LOG_MAGIC = 0x54574c31; // 'TWL1'
export const LOG_HEADER_BYTES = 40;
/**
 * Largest record appended synchronously on the event loop (writeNow): a page-cache
 * copy of this size takes some tens of microseconds, cheaper than a thread-pool trip.
 */
export const SYNC_APPEND_MAX_BYTES = 256 * 1024;
/** Largest write record accepted on replay (an NBD write is at most 32 MiB). */
const MAX_RECORD_DATA = 64 * 1024 * 1024;

export const LogKind = { Open: 0, Write: 1, Zeroes: 2, Completed: 3 } as const;
export type LogKind = (typeof LogKind)[keyof typeof LogKind];

export interface LogMeta {
  vm: string;
  migrationId: string;
  /** Disk size in bytes: a log of another disk is refused. */
  size: number;
}

export type LogRecord =
  | { kind: typeof LogKind.Write; epoch: number; offset: number; data: Buffer }
  | { kind: typeof LogKind.Zeroes; epoch: number; offset: number; length: number }
  | { kind: typeof LogKind.Completed; epoch: number };

/** The log file of a VM's migration. */
export function journalLogPath(dir: string, vm: string, migrationId: string): string {
  return path.join(dir, `${vm}.${migrationId}.wal`);
}

/** Every log file of `vm` in `dir` (normally none or one). */
export async function findJournalLogs(dir: string, vm: string): Promise<string[]> {
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  return names.filter((n) => n.startsWith(`${vm}.`) && n.endsWith('.wal')).map((n) => path.join(dir, n));
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

export class JournalLog {
  readonly path: string;
  #fd: number;
  #pos: number;
  #queue: { bufs: Buffer[]; bytes: number; done: () => void; fail: (e: Error) => void }[] = [];
  #writing = false;
  /** Resolves once everything appended so far is written. */
  #idle: Promise<void> = Promise.resolve();
  #idleDone: (() => void) | null = null;
  #error: Error | null = null;
  #closed = false;
  /** Figures for benchmarks. */
  readonly stats = { records: 0, bytes: 0, writes: 0, syncs: 0 };

  private constructor(file: string, fd: number, pos: number) {
    this.path = file;
    this.#fd = fd;
    this.#pos = pos;
  }

  /** A new log (an existing file of that name is replaced), its open record durable. */
  static async create(file: string, meta: LogMeta): Promise<JournalLog> {
    await fsp.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    const fd = await new Promise<number>((res, rej) => fs.open(file, 'w', 0o600, (e, fd) => (e ? rej(e) : res(fd))));
    const log = new JournalLog(file, fd, 0);
    await log.#append(encodeRecord(LogKind.Open, 0, 0, 0, Buffer.from(JSON.stringify(meta))));
    await log.sync();
    await syncDir(path.dirname(file));
    return log;
  }

  /**
   * Opens an existing log to append to it: everything from `validEnd` (the end of the
   * last good record, from replay()) on is cut off first, so a torn tail cannot hide
   * the records appended after it.
   */
  static async reopen(file: string, validEnd: number): Promise<JournalLog> {
    const fd = await new Promise<number>((res, rej) => fs.open(file, 'r+', (e, fd) => (e ? rej(e) : res(fd))));
    await new Promise<void>((res, rej) => fs.ftruncate(fd, validEnd, (e) => (e ? rej(e) : res())));
    await new Promise<void>((res, rej) => fs.fdatasync(fd, (e) => (e ? rej(e) : res())));
    return new JournalLog(file, fd, validEnd);
  }

  /** Bytes written so far (the end of the last record). */
  get size(): number {
    return this.#pos;
  }

  /**
   * The write's record appended now, on the caller's thread (a page-cache copy), when
   * nothing is queued ahead of it and it is at most SYNC_APPEND_MAX_BYTES: true when
   * done; false: use write(). A failure is sticky and thrown.
   */
  writeNow(epoch: number, offset: number, data: Buffer): boolean {
    if (this.#writing || this.#closed || this.#error || data.length > SYNC_APPEND_MAX_BYTES) return false;
    const bufs = encodeRecord(LogKind.Write, epoch, offset, data.length, data);
    const bytes = LOG_HEADER_BYTES + data.length;
    try {
      let n = fs.writevSync(this.#fd, bufs, this.#pos);
      if (n !== bytes) {
        const rest = Buffer.concat(bufs).subarray(n);
        for (let done = 0; done < rest.length; done += n) {
          n = fs.writeSync(this.#fd, rest, done, rest.length - done, this.#pos + (bytes - rest.length) + done);
          if (n <= 0) throw new TetherError('ERR_JOURNAL_LOG', 'write made no progress');
        }
      }
    } catch (e) {
      this.#error = new TetherError('ERR_JOURNAL_LOG', `appending to the journal log ${this.path} failed: ${(e as Error).message}`);
      throw this.#error;
    }
    this.#pos += bytes;
    this.stats.records++;
    this.stats.bytes += bytes;
    this.stats.writes++;
    return true;
  }

  write(epoch: number, offset: number, data: Buffer): Promise<void> {
    return this.#append(encodeRecord(LogKind.Write, epoch, offset, data.length, data));
  }

  zeroes(epoch: number, offset: number, length: number): Promise<void> {
    return this.#append(encodeRecord(LogKind.Zeroes, epoch, offset, length));
  }

  /** The source recorded completion with `finalEpoch`: durable before any write-back starts. */
  async completed(finalEpoch: number): Promise<void> {
    await this.#append(encodeRecord(LogKind.Completed, finalEpoch, 0, 0));
    await this.sync();
  }

  #append(bufs: Buffer[]): Promise<void> {
    if (this.#error) return Promise.reject(this.#error);
    if (this.#closed) return Promise.reject(new TetherError('ERR_JOURNAL_LOG', `journal log ${this.path} is closed`));
    let bytes = 0;
    for (const b of bufs) bytes += b.length;
    const p = new Promise<void>((done, fail) => this.#queue.push({ bufs, bytes, done, fail }));
    if (!this.#writing) {
      this.#writing = true;
      this.#idle = new Promise((r) => (this.#idleDone = r));
      void this.#pump();
    }
    return p;
  }

  async #pump(): Promise<void> {
    while (this.#queue.length > 0) {
      const batch = this.#queue;
      this.#queue = [];
      const bufs: Buffer[] = [];
      let bytes = 0;
      for (const q of batch) {
        bufs.push(...q.bufs);
        bytes += q.bytes;
      }
      try {
        if (this.#error) throw this.#error;
        await writeAll(this.#fd, bufs, bytes, this.#pos);
        this.#pos += bytes;
        this.stats.records += batch.length;
        this.stats.bytes += bytes;
        this.stats.writes++;
        for (const q of batch) q.done();
      } catch (e) {
        // Sticky: a record that did not reach the log must not be followed by later ones.
        this.#error ??= new TetherError('ERR_JOURNAL_LOG', `appending to the journal log ${this.path} failed: ${(e as Error).message}`);
        for (const q of batch) q.fail(this.#error);
      }
    }
    this.#writing = false;
    this.#idleDone?.();
    this.#idleDone = null;
  }

  /** Everything appended before this call is written and fdatasync'ed. */
  async sync(): Promise<void> {
    await this.#idle;
    if (this.#error) throw this.#error;
    this.stats.syncs++;
    await new Promise<void>((res, rej) => fs.fdatasync(this.#fd, (e) => (e ? rej(e) : res())));
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#idle;
    await new Promise<void>((res) => fs.close(this.#fd, () => res()));
  }

  /** Close and delete the file: the journal was written back or discarded. */
  async remove(): Promise<void> {
    await this.close();
    await fsp.rm(this.path, { force: true });
  }
}

async function writeAll(fd: number, bufs: Buffer[], bytes: number, pos: number): Promise<void> {
  let n = await new Promise<number>((res, rej) => fs.writev(fd, bufs, pos, (e, n) => (e ? rej(e) : res(n))));
  if (n === bytes) return;
  // A short write (rare on a regular file): write the rest as one buffer.
  const rest = Buffer.concat(bufs).subarray(n);
  let done = 0;
  while (done < rest.length) {
    n = await new Promise<number>((res, rej) =>
      fs.write(fd, rest, done, rest.length - done, pos + (bytes - rest.length) + done, (e, k) => (e ? rej(e) : res(k))),
    );
    if (n <= 0) throw new TetherError('ERR_JOURNAL_LOG', 'write made no progress');
    done += n;
  }
}

async function syncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } catch {
    // some file systems refuse fsync on a directory: the file's own fdatasync stands
  } finally {
    await fh.close();
  }
}

export interface Replay {
  meta: LogMeta;
  records: LogRecord[];
  /** End of the last good record: reopen() cuts the file here. */
  validEnd: number;
  /** Bytes after validEnd that were ignored (a torn or corrupt tail). */
  ignoredBytes: number;
  /** The final epoch of a `completed` record, or null. */
  completed: number | null;
}

/**
 * Reads a log. A record that is short, fails its checksum or is malformed ends the
 * replay (a torn tail); a file whose open record is unreadable is ERR_JOURNAL_LOG.
 * Records of epochs <= `afterEpoch` are skipped (their data is not kept): the source
 * holds them already.
 */
export async function replayJournalLog(file: string, afterEpoch = 0): Promise<Replay> {
  const fh = await fsp.open(file, 'r');
  try {
    const { size } = await fh.stat();
    const records: LogRecord[] = [];
    let meta: LogMeta | null = null;
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
          meta = JSON.parse(data.toString('utf8')) as LogMeta;
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
    if (!meta) throw new TetherError('ERR_JOURNAL_LOG', `journal log ${file} has no readable open record`);
    return { meta, records, validEnd: pos, ignoredBytes: size - pos, completed };
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
