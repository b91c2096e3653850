/**
 * The checkpoint store's file primitives (store.ts): every file it writes is replaced by
 * tmp + fsync + rename + fsync(dir); the small records may use the room of the reserve
 * file when the tmpfs is full. Errors of the file system become ERR_CKPT_IO.
 */
import { constants as fsc } from 'node:fs';
import { open, readdir, readFile, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { TetherError } from '../errors.ts';
import { ignored, type Logger } from '../util/log.ts';

/** The reserve file in a store's directory. */
export const RESERVE = 'reserve.bin';
/** Room kept for the records (a few 4 KiB tmpfs pages each, tmp and final at once). */
export const RESERVE_BYTES = 64 * 1024;
const IOV_MAX = 1024;

/** A failure of the file system as ERR_CKPT_IO (a TetherError is kept as it is). */
export function ioError(what: string, e: unknown): TetherError {
  if (e instanceof TetherError) return e;
  const err = e as NodeJS.ErrnoException;
  return new TetherError('ERR_CKPT_IO', `${what}: ${err.message ?? String(e)}`, { errno: err.code });
}

export function isEnoent(e: unknown): boolean {
  return (e as NodeJS.ErrnoException)?.code === 'ENOENT';
}

/** The text of `file`, or null when it does not exist; another failure is ERR_CKPT_IO (`what`). */
export async function readIfExists(file: string, what: string): Promise<string | null> {
  try {
    return await readFile(file, 'utf8');
  } catch (e) {
    if (isEnoent(e)) return null;
    throw ioError(what, e);
  }
}

/** Writes every byte of `bufs` at `position`, in batches of at most IOV_MAX, retrying short writes. */
export async function writeAll(fh: FileHandle, bufs: Buffer[], position: number): Promise<void> {
  let pending = bufs.filter((b) => b.length > 0);
  let pos = position;
  while (pending.length > 0) {
    const batch = pending.slice(0, IOV_MAX);
    let want = 0;
    for (const b of batch) want += b.length;
    const { bytesWritten } = await fh.writev(batch, pos);
    pos += bytesWritten;
    if (bytesWritten === want) {
      pending = pending.slice(batch.length);
      continue;
    }
    if (bytesWritten <= 0) throw new TetherError('ERR_CKPT_IO', 'write made no progress');
    // Short write: drop what was written and go on with the rest.
    let skip = bytesWritten;
    while (skip > 0) {
      const head = pending[0]!;
      if (head.length <= skip) {
        skip -= head.length;
        pending.shift();
      } else {
        pending[0] = head.subarray(skip);
        skip = 0;
      }
    }
  }
}

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** tmp + fsync + rename + fsync(dir). */
export async function writeAtomic(file: string, bufs: Buffer[]): Promise<void> {
  const tmp = `${file}.tmp`;
  const fh = await open(tmp, 'w', 0o600);
  try {
    await writeAll(fh, bufs, 0);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, file);
  await fsyncDir(path.dirname(file));
}

/**
 * writeAtomic for the small records: on ENOSPC the reserve file in the same directory is
 * removed (its room freed) and the write retried once.
 */
export async function writeRecord(file: string, bufs: Buffer[]): Promise<void> {
  try {
    await writeAtomic(file, bufs);
  } catch (e) {
    if ((e as NodeJS.ErrnoException)?.code !== 'ENOSPC') throw e;
    const dir = path.dirname(file);
    await rm(`${file}.tmp`, { force: true });
    await rm(path.join(dir, RESERVE), { force: true });
    await writeAtomic(file, bufs);
  }
}

/** (Re)creates the reserve file when it is missing; best effort (a full tmpfs just has none). */
export async function ensureReserve(dir: string, log: Logger | undefined): Promise<void> {
  const file = path.join(dir, RESERVE);
  try {
    if ((await stat(file)).size === RESERVE_BYTES) return;
  } catch (e) {
    ignored(log, 'a missing reserve file is written below')(e);
  }
  try {
    await writeAtomic(file, [Buffer.alloc(RESERVE_BYTES)]);
  } catch (e) {
    log?.warn('the checkpoint store has no reserve file (a full tmpfs?): a record may not fit later', {
      dir,
      error: ioError('reserve', e),
    });
    await rm(`${file}.tmp`, { force: true }).catch(ignored(log, 'the reserve tmp file may not exist'));
  }
}

/** Names in `dir`; none when it does not exist. */
export async function listDir(dir: string): Promise<string[]> {
  try {
    return await readdir(dir);
  } catch (e) {
    if (isEnoent(e)) return [];
    throw e;
  }
}
