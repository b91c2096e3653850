/**
 * A checkpoint's pages and the guest's RAM file (the checkpoint store's, store.ts):
 * validation of a checkpoint against guest RAM, and the page writes into the RAM file.
 */
import { open, stat } from 'node:fs/promises';
import { TetherError } from '../errors.ts';
import type { Checkpoint } from './assembler.ts';
import { MAX_DISK_ZERO_BYTES, PAGE_SIZE } from './messages.ts';
import { writeAll } from './store-files.ts';

const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/**
 * Throws ERR_CKPT_INVALID / ERR_CKPT_PFN_RANGE / ERR_CKPT_DUPLICATE_PAGE unless the checkpoint
 * is internally consistent and fits a guest of `ramPages` pages.
 */
export function validateCheckpoint(ckpt: Checkpoint, ramPages: number): void {
  const { pfns, zeroMask } = ckpt;
  if (!Number.isSafeInteger(ckpt.epoch) || ckpt.epoch < 0) {
    throw new TetherError('ERR_CKPT_INVALID', 'checkpoint epoch is not a safe non-negative integer');
  }
  if (!(pfns instanceof Uint32Array) || !(zeroMask instanceof Uint8Array) || zeroMask.length !== pfns.length) {
    throw new TetherError('ERR_CKPT_INVALID', 'pfns and zeroMask differ in length');
  }
  const seen = new Uint8Array(Math.ceil(ramPages / 8));
  let nonZero = 0;
  for (let i = 0; i < pfns.length; i++) {
    const pfn = pfns[i]!;
    if (pfn >= ramPages) throw new TetherError('ERR_CKPT_PFN_RANGE', `pfn ${pfn} outside guest RAM`, { pfn, ramPages });
    const bit = 1 << (pfn & 7);
    if ((seen[pfn >>> 3]! & bit) !== 0) throw new TetherError('ERR_CKPT_DUPLICATE_PAGE', `pfn ${pfn} twice`, { pfn });
    seen[pfn >>> 3]! |= bit;
    const z = zeroMask[i]!;
    if (z > 1) throw new TetherError('ERR_CKPT_INVALID', 'zeroMask entries must be 0 or 1');
    if (z === 0) nonZero++;
  }
  if (ckpt.data.length !== nonZero * PAGE_SIZE) {
    throw new TetherError('ERR_CKPT_INVALID', 'page data does not match the non-zero pages');
  }
  for (const d of ckpt.disk) {
    const ok = d.zero ? Number.isSafeInteger(d.length) && d.length >= 1 && d.length <= MAX_DISK_ZERO_BYTES : Buffer.isBuffer(d.data);
    if (!Number.isSafeInteger(d.offset) || d.offset < 0 || !ok) {
      throw new TetherError('ERR_CKPT_INVALID', 'bad disk extent');
    }
  }
  if (!Buffer.isBuffer(ckpt.devstate)) throw new TetherError('ERR_CKPT_INVALID', 'devstate must be a Buffer');
}

/** Throws ERR_CKPT_RAM_FILE unless the RAM file exists and holds at least `ramBytes`. */
export async function checkRamFile(ramPath: string, ramBytes: number): Promise<void> {
  let size: number;
  try {
    size = (await stat(ramPath)).size;
  } catch (e) {
    throw new TetherError('ERR_CKPT_RAM_FILE', `RAM file ${ramPath} unusable: ${(e as Error).message}`);
  }
  if (size < ramBytes) {
    throw new TetherError('ERR_CKPT_RAM_FILE', `RAM file ${ramPath} has ${size} bytes, expected ${ramBytes}`);
  }
}

/**
 * pwrites the checkpoint's pages at pfn × 4096 in ascending pfn order, contiguous pfns as
 * one writev, then fdatasync. `afterRun(written, total)` is called after each run of pages
 * (the store's page-failure hook; it may throw to fail the write there).
 */
export async function writePages(ramPath: string, ckpt: Checkpoint, afterRun?: (written: number, total: number) => void): Promise<void> {
  const { pfns, zeroMask, data } = ckpt;
  const n = pfns.length;
  if (n === 0) return;
  const dataIndex = new Int32Array(n);
  for (let i = 0, k = 0; i < n; i++) dataIndex[i] = zeroMask[i] === 1 ? -1 : k++;
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  order.sort((a, b) => pfns[a]! - pfns[b]!);

  const page = (i: number): Buffer => {
    const k = dataIndex[i]!;
    return k < 0 ? ZERO_PAGE : data.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
  };
  const fh = await open(ramPath, 'r+');
  try {
    let j = 0;
    while (j < n) {
      const start = pfns[order[j]!]!;
      const run: Buffer[] = [page(order[j]!)];
      j++;
      while (j < n && pfns[order[j]!] === start + run.length) {
        run.push(page(order[j]!));
        j++;
      }
      await writeAll(fh, run, start * PAGE_SIZE);
      afterRun?.(j, n);
    }
    await fh.datasync();
  } finally {
    await fh.close();
  }
}
