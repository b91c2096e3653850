/**
 * RAM-file helpers shared by the source and the trackers.
 */
import { open } from 'node:fs/promises';
import { TetherError } from '../errors.ts';
import { hashFile, mapRam, PAGE_SIZE, unmapRam } from '../native.ts';

/** Largest page count a Uint32Array pfn can address. */
export const MAX_RAM_PAGES = 0xffff_ffff;

/** Number of 4 KiB pages in `ramBytes`; throws ERR_MEM_RAM_SIZE unless a positive multiple of 4096. */
export function ramPages(ramBytes: number): number {
  if (!Number.isSafeInteger(ramBytes) || ramBytes <= 0 || ramBytes % PAGE_SIZE !== 0) {
    throw new TetherError('ERR_MEM_RAM_SIZE', `RAM size ${ramBytes} is not a positive multiple of ${PAGE_SIZE}`, {
      ramBytes,
    });
  }
  const pages = ramBytes / PAGE_SIZE;
  if (pages > MAX_RAM_PAGES) {
    throw new TetherError('ERR_MEM_RAM_SIZE', `RAM size ${ramBytes} has more than 2^32-1 pages`, { ramBytes });
  }
  return pages;
}

export interface HashOptions {
  /** Native threads for hashing (default 2; VM config checkpoint.hashThreads). */
  threads?: number;
}

/**
 * The per-page hash table of a RAM file (8 bytes per page, little-endian
 * XXH64): what S sends to D before the first checkpoint. Holes hash like zero
 * pages. Runs off the main thread (the event loop keeps serving heartbeats);
 * call it with the VM paused or on a RAM file nobody writes.
 */
export async function hashRamFile(path: string, bytes: number, opts: HashOptions = {}): Promise<Buffer> {
  const pages = ramPages(bytes);
  const fh = await openRam(path, bytes);
  let map = null;
  try {
    const out = Buffer.allocUnsafe(pages * 8);
    map = mapRam(fh.fd, pages); // in place on tmpfs (about half the CPU of pread), else null
    await hashFile(fh.fd, pages, out, opts.threads, map);
    return out;
  } finally {
    if (map) unmapRam(map);
    await fh.close();
  }
}

/**
 * Opens a guest RAM file read-only and checks that it covers `minBytes`
 * (a shorter file means the wrong file or a VM of another size).
 */
export async function openRam(path: string, minBytes = 0) {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new TetherError('ERR_MEM_RAM_FILE', `cannot open RAM file ${path}: ${err.message}`, {
      path,
      errno: err.errno,
      syscall: err.syscall,
    });
  }
  const st = await fh.stat();
  if (st.size < minBytes) {
    await fh.close();
    throw new TetherError('ERR_MEM_RAM_FILE', `RAM file ${path} is ${st.size} bytes, expected at least ${minBytes}`, {
      path,
      size: st.size,
      ramBytes: minBytes,
    });
  }
  return fh;
}
