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
 * Segments: the log is a sequence of files, `<name>.wal` then `<name>.wal.1`, `.wal.2` …;
 * each starts with its own open record (the same metadata, its segment number and the
 * first epoch it can hold). At a barrier whose segment has grown past `segmentBytes`
 * (VM config disk.journalSegmentBytes, default half the journal's bound) the writer starts
 * the next, its open record and directory entry durable before any record goes there; the
 * closed segment is not fdatasync'ed then (that would stall every guest write behind a
 * whole segment's writeback) but by the next FLUSH/FUA, before the current one. Once the
 * source has acknowledged every epoch a closed segment holds, the file is deleted, oldest
 * first. So the log holds the unacknowledged epochs plus at most the rest of their first
 * segment, not everything the guest wrote in the window. A sidecar crash tears at most the
 * last record of the last segment (the page cache survives it); a power loss can also tear
 * a closed segment that no FLUSH synced since, and then the log ends there: the later
 * segments hold only writes no FLUSH covered, which a disk may lose (journal-replay.ts).
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
import { TetherError } from '../errors.ts';
import {
  LOG_HEADER_BYTES,
  LogKind,
  SYNC_APPEND_MAX_BYTES,
  encodeRecord,
  removeJournalLog,
  segmentFile,
  type LogMeta,
  type SegmentMeta,
} from './journal-format.ts';
import type { Replay } from './journal-replay.ts';

export * from './journal-format.ts';
export { replayJournalLog, type Replay } from './journal-replay.ts';

type Queued =
  | { bufs: Buffer[]; bytes: number; done: () => void; fail: (e: Error) => void }
  /** Start the next segment here: every epoch up to `lastEpoch` is in the ones before. */
  | { rotate: number };

export interface LogOptions {
  /** Start a new segment at a barrier once the current one holds this many bytes (default: never). */
  segmentBytes?: number;
}

export class JournalLog {
  /** The log's name: its segment 0's path. */
  readonly path: string;
  readonly #meta: LogMeta;
  readonly #segmentBytes: number;
  /** The segment being appended to, its descriptor and end. */
  #seg: number;
  #fd: number;
  #pos: number;
  /** Bytes queued behind #pos in the current segment (rotation decides on #pos + this). */
  #queuedBytes = 0;
  /** Closed segments still on disk, oldest first (see ClosedSegment). */
  #closed: ClosedSegment[];
  /** sync() calls in flight: descriptors are closed only when none is (closeFd). */
  #syncing = 0;
  #closeLater: number[] = [];
  #queue: Queued[] = [];
  #writing = false;
  /** Resolves once everything appended so far is written. */
  #idle: Promise<void> = Promise.resolve();
  #idleDone: (() => void) | null = null;
  #error: Error | null = null;
  #isClosed = false;
  /** Deletions of released segments, one after the other. */
  #pruning: Promise<void> = Promise.resolve();
  /** The last failed deletion of a released segment (the file stays until remove()), or null. */
  pruneError: Error | null = null;
  /** Figures for benchmarks and `tether status`: `syncs` sync() calls, `segmentSyncs` closed segments they fdatasync'ed. */
  readonly stats = { records: 0, bytes: 0, writes: 0, syncs: 0, segmentSyncs: 0, segments: 1, segmentsRemoved: 0 };

  private constructor(file: string, meta: LogMeta, fd: number, seg: number, pos: number, closed: ClosedSegment[], o: LogOptions) {
    this.path = file;
    this.#meta = meta;
    this.#fd = fd;
    this.#seg = seg;
    this.#pos = pos;
    this.#closed = closed;
    this.#segmentBytes = o.segmentBytes ?? Infinity;
    this.stats.segments = closed.length + 1;
  }

  /** A new log (existing segments of that name are removed first), its open record durable. */
  static async create(file: string, meta: LogMeta, o: LogOptions = {}): Promise<JournalLog> {
    await fsp.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    await removeJournalLog(file);
    const { fd, end } = await openSegment(file, 0, meta, 1);
    return new JournalLog(file, meta, fd, 0, end, [], o);
  }

  /**
   * Opens an existing log to append to it: the segment the replay ended in is cut at
   * `replay.validEnd` (the end of its last good record) first, and any segment after it
   * deleted, so a torn tail cannot hide the records appended after it.
   */
  static async reopen(file: string, replay: Replay, o: LogOptions = {}): Promise<JournalLog> {
    const segs = replay.segments;
    const last = segs[segs.length - 1]!;
    // after a torn closed segment: writes no FLUSH covered, never read back; the log goes on from the tear
    for (const n of replay.beyondTear) await fsp.rm(segmentFile(file, n), { force: true });
    const fd = await new Promise<number>((res, rej) => fs.open(segmentFile(file, last.n), 'r+', (e, fd) => (e ? rej(e) : res(fd))));
    await new Promise<void>((res, rej) => fs.ftruncate(fd, replay.validEnd, (e) => (e ? rej(e) : res())));
    await fdatasync(fd);
    // synced below, their descriptors closed again
    const closed = segs
      .slice(0, -1)
      .map((g, i): ClosedSegment => ({ n: g.n, lastEpoch: segs[i + 1]!.firstEpoch - 1, fd: null, synced: true }));
    // The closed segments' writes were acknowledged before the restart, maybe with no FLUSH
    // since: a FLUSH from now on covers them too, and this one does it now.
    for (const g of closed) {
      const cfd = await new Promise<number>((res, rej) => fs.open(segmentFile(file, g.n), 'r', (e, fd) => (e ? rej(e) : res(fd))));
      try {
        await fdatasync(cfd);
      } finally {
        fs.close(cfd, () => undefined);
      }
    }
    return new JournalLog(file, replay.meta, fd, last.n, replay.validEnd, closed, o);
  }

  /** The end of the last record written to the current segment (its file: `file`). */
  get size(): number {
    return this.#pos;
  }

  /** The current segment's file. */
  get file(): string {
    return segmentFile(this.path, this.#seg);
  }

  /**
   * The write's record appended now, on the caller's thread (a page-cache copy), when
   * nothing is queued ahead of it and it is at most SYNC_APPEND_MAX_BYTES: true when
   * done; false: use write(). A failure is sticky and thrown.
   */
  writeNow(epoch: number, offset: number, data: Buffer): boolean {
    if (this.#writing || this.#isClosed || this.#error || data.length > SYNC_APPEND_MAX_BYTES) return false;
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
      this.#error = new TetherError('ERR_JOURNAL_LOG', `appending to the journal log ${this.file} failed: ${(e as Error).message}`);
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

  /**
   * Epoch `sealed` was sealed (every record of it is appended or queued): if the current
   * segment has grown past segmentBytes, what is appended from now on goes to a new one.
   */
  sealed(sealed: number): void {
    if (this.#isClosed || this.#error || this.#pos + this.#queuedBytes < this.#segmentBytes) return;
    this.#queuedBytes = 0;
    this.#enqueue({ rotate: sealed });
  }

  /**
   * The source holds every epoch up to `epoch`: the closed segments that hold nothing
   * later are deleted (oldest first, one at a time; a deletion a crash loses is harmless:
   * a replay skips acknowledged epochs).
   */
  released(epoch: number): Promise<void> {
    const gone: number[] = [];
    while (this.#closed.length > 0 && this.#closed[0]!.lastEpoch <= epoch) {
      const g = this.#closed.shift()!;
      // a segment about to go needs no fdatasync; a sync() using its descriptor keeps it until it returns
      if (g.fd !== null) this.#closeFd(g.fd);
      g.fd = null;
      gone.push(g.n);
    }
    if (gone.length === 0) return this.#pruning;
    this.#pruning = this.#pruning
      .then(async () => {
        for (const n of gone) {
          await fsp.rm(segmentFile(this.path, n), { force: true });
          this.stats.segmentsRemoved++;
        }
      })
      .catch((e: unknown) => {
        // left on disk: it costs space, not correctness (a replay skips its epochs); remove() retries
        this.pruneError = e as Error;
      });
    return this.#pruning;
  }

  #append(bufs: Buffer[]): Promise<void> {
    if (this.#error) return Promise.reject(this.#error);
    if (this.#isClosed) return Promise.reject(new TetherError('ERR_JOURNAL_LOG', `journal log ${this.path} is closed`));
    let bytes = 0;
    for (const b of bufs) bytes += b.length;
    this.#queuedBytes += bytes;
    return new Promise<void>((done, fail) => this.#enqueue({ bufs, bytes, done, fail }));
  }

  #enqueue(q: Queued): void {
    this.#queue.push(q);
    if (!this.#writing) {
      this.#writing = true;
      this.#idle = new Promise((r) => (this.#idleDone = r));
      void this.#pump();
    }
  }

  async #pump(): Promise<void> {
    while (this.#queue.length > 0) {
      const head = this.#queue[0]!;
      if ('rotate' in head) {
        this.#queue.shift();
        await this.#rotate(head.rotate);
        continue;
      }
      // records up to the next rotation, as one writev
      const k = this.#queue.findIndex((q) => 'rotate' in q);
      const batch = this.#queue.splice(0, k < 0 ? this.#queue.length : k) as Extract<Queued, { bufs: Buffer[] }>[];
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
        this.#error ??= new TetherError('ERR_JOURNAL_LOG', `appending to the journal log ${this.file} failed: ${(e as Error).message}`);
        for (const q of batch) q.fail(this.#error);
      }
      this.#queuedBytes = Math.max(0, this.#queuedBytes - bytes);
    }
    this.#writing = false;
    this.#idleDone?.();
    this.#idleDone = null;
  }

  /** Open the next segment, durable, before anything goes there; the current one waits for the next sync(). */
  async #rotate(lastEpoch: number): Promise<void> {
    if (this.#error) return;
    try {
      const { fd, end } = await openSegment(this.path, this.#seg + 1, this.#meta, lastEpoch + 1);
      this.#closed.push({ n: this.#seg, lastEpoch, fd: this.#fd, synced: false });
      this.#seg++;
      this.#fd = fd;
      this.#pos = end;
      this.stats.segments++;
    } catch (e) {
      this.#error ??= new TetherError(
        'ERR_JOURNAL_LOG',
        `starting segment ${this.#seg + 1} of the journal log ${this.path} failed: ${(e as Error).message}`,
      );
    }
  }

  /**
   * Everything appended before this call is written and fdatasync'ed: the closed segments
   * no sync covered yet, oldest first (then closed), then the current one.
   */
  async sync(): Promise<void> {
    await this.#idle;
    if (this.#error) throw this.#error;
    // taken together, at once: a rotation after this point holds only later records. A
    // segment another sync() is still syncing is synced here too: this call must not return
    // before it is durable.
    const closed = this.#closed.filter((g) => !g.synced && g.fd !== null).map((g) => ({ g, fd: g.fd! }));
    const fd = this.#fd;
    this.stats.syncs++;
    this.#syncing++;
    try {
      for (const c of closed) {
        await fdatasync(c.fd);
        this.stats.segmentSyncs++;
      }
      await fdatasync(fd);
      for (const c of closed) c.g.synced = true;
    } catch (e) {
      // Sticky: after a failed fdatasync the kernel may have dropped the dirty pages and
      // report the next one as a success, so no later FLUSH of this log may be acknowledged.
      this.#error ??= new TetherError('ERR_JOURNAL_LOG', `fdatasync of the journal log ${this.path} failed: ${(e as Error).message}`);
      throw this.#error;
    } finally {
      if (--this.#syncing === 0) for (const f of this.#closeLater.splice(0)) fs.close(f, () => undefined);
    }
  }

  /** Close a descriptor now, or once no sync() is using descriptors. */
  #closeFd(fd: number): void {
    if (this.#syncing > 0) this.#closeLater.push(fd);
    else fs.close(fd, () => undefined);
  }

  async close(): Promise<void> {
    if (this.#isClosed) return;
    this.#isClosed = true;
    await this.#idle;
    await this.#pruning;
    for (const g of this.#closed) {
      if (g.fd !== null) this.#closeFd(g.fd);
      g.fd = null;
    }
    this.#closeFd(this.#fd);
  }

  /** Close and delete every segment: the journal was written back or discarded. */
  async remove(): Promise<void> {
    await this.close();
    await removeJournalLog(this.path);
  }
}

/**
 * A closed segment still on disk: the last epoch it can hold (it is deleted once the source
 * acknowledged that one), its descriptor while it is open (null once closed: deleted, or a
 * segment a reopen found and synced), and whether a sync() made it durable since it was
 * closed (until then every sync() fdatasyncs it before the current segment).
 */
interface ClosedSegment {
  n: number;
  lastEpoch: number;
  fd: number | null;
  synced: boolean;
}

function fdatasync(fd: number): Promise<void> {
  return new Promise<void>((res, rej) => fs.fdatasync(fd, (e) => (e ? rej(e) : res())));
}

/**
 * Creates segment `n` (replacing a file of that name) with its open record, durable with its
 * directory entry; `end` is where the next record goes.
 */
async function openSegment(file: string, n: number, meta: LogMeta, firstEpoch: number): Promise<{ fd: number; end: number }> {
  const f = segmentFile(file, n);
  const fd = await new Promise<number>((res, rej) => fs.open(f, 'w', 0o600, (e, fd) => (e ? rej(e) : res(fd))));
  const m: SegmentMeta = n === 0 ? meta : { ...meta, segment: n, firstEpoch };
  const bufs = encodeRecord(LogKind.Open, 0, 0, 0, Buffer.from(JSON.stringify(m)));
  const end = bufs.reduce((k, b) => k + b.length, 0);
  try {
    await writeAll(fd, bufs, end, 0);
    await fdatasync(fd);
    await syncDir(path.dirname(f));
  } catch (e) {
    await new Promise<void>((res) => fs.close(fd, () => res()));
    throw e;
  }
  return { fd, end };
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
