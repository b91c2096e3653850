/**
 * Direct I/O helpers for the journal's reads of the shared image (docs/journal.md,
 * "Reading the image on the destination"). O_DIRECT needs the buffer address, the file
 * offset and the length aligned to the file's direct-I/O alignment (the device's logical
 * block size); Node Buffers carry no alignment guarantee, so a read buffer is
 * over-allocated and sliced at an aligned address, which the native addon reports
 * (addressMod) and which is checked, never assumed.
 */
import { TetherError } from '../errors.ts';
import { loadNative } from '../native.ts';

/** Alignment used when the file system does not report one (statx STATX_DIOALIGN): safe for 512 B and 4 KiB sectors. */
export const DEFAULT_DIRECT_ALIGN = 4096;
/** posix_fadvise advice */
export const POSIX_FADV_DONTNEED = 4;

interface DirectNative {
  addressMod(buf: Uint8Array, m: number): number;
  dioAlign(fd: number): [number, number] | null;
  fadvise(fd: number, offset: number, length: number, advice: number): number;
  residentPages(fd: number, offset: number, length: number): number;
}

/** The addon's direct-I/O calls, or undefined when it is not built (or predates them). */
export function directNative(): DirectNative | undefined {
  try {
    const b = loadNative() as unknown as Partial<DirectNative>;
    if (typeof b.addressMod !== 'function' || typeof b.dioAlign !== 'function' || typeof b.fadvise !== 'function') return undefined;
    return b as DirectNative;
  } catch {
    return undefined;
  }
}

function isPow2(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/**
 * The alignment direct reads of `fd` need: what statx reports (the larger of the memory
 * and offset alignment, at least 512), else DEFAULT_DIRECT_ALIGN.
 */
export function directAlignment(native: DirectNative, fd: number): number {
  const r = native.dioAlign(fd);
  if (!r) return DEFAULT_DIRECT_ALIGN;
  const a = Math.max(r[0], r[1], 512);
  return isPow2(a) && a <= 1024 * 1024 ? a : DEFAULT_DIRECT_ALIGN;
}

/** `length` bytes whose first byte's address is a multiple of `align` (not zeroed). */
export function alignedBuffer(native: DirectNative, length: number, align: number): Buffer {
  const raw = Buffer.allocUnsafeSlow(length + align);
  const mod = native.addressMod(raw, align);
  const buf = raw.subarray(mod === 0 ? 0 : align - mod, (mod === 0 ? 0 : align - mod) + length);
  if (native.addressMod(buf, align) !== 0) {
    throw new TetherError('ERR_DISK_DIRECT', `could not align a ${length}-byte read buffer to ${align} bytes`);
  }
  return buf;
}
