/**
 * Typed access to the `tether_native` addon (native/, plain C over N-API).
 *
 * One loader for every user (memory/ for RAM, disk/ for the image helpers, net/tap.ts for
 * TAP devices, check/). The addon is loaded lazily on first use so that importing this
 * module never fails; a missing build surfaces as ERR_MEM_NATIVE_MISSING. Errors the addon
 * throws (ERR_MEM_NATIVE_ARGS, ERR_MEM_IO with errno/syscall) are re-thrown as
 * TetherError with the same code.
 *
 * hashFile, scanDirty and scanCopy run off the main thread (N-API async work on the libuv
 * pool, fanned out to `threads` native threads) and return Promises: hashing a
 * large RAM file must not stall heartbeats and lease timers. Bad arguments
 * still throw synchronously; I/O failures reject. The other calls are
 * synchronous and small. Guest RAM is read with pread, or, for a tracker's scans of a
 * RAM file on tmpfs, through a read-only mapping held for the tracker's life (mapRam):
 * only pages SEEK_DATA reports as data are ever touched, since a read fault on a tmpfs
 * hole would allocate it (and hide it from QEMU's post-copy userfaultfd).
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { isErrorCode, TetherError } from './errors.ts';

export const PAGE_SIZE = 4096;

/** The addon's scanDirty/scanCopy signature (they differ only in what they resolve with). */
type ScanCall<T> = (
  fd: number,
  pages: number,
  table: Uint8Array,
  candidates: Uint32Array | null,
  threads?: number,
  map?: RamMap | null,
  delayMs?: number,
) => Promise<T>;

export interface NativeBinding {
  hashFile(fd: number, pages: number, out: Uint8Array, threads?: number, map?: RamMap | null): Promise<void>;
  scanDirty: ScanCall<Uint32Array>;
  scanCopy: ScanCall<DirtyPages>;
  mapRam(fd: number, pages: number): RamMap | null;
  unmapRam(map: RamMap): void;
  hashBuffer(buf: Uint8Array): Buffer;
  readPages(fd: number, pfns: Uint32Array, out: Uint8Array): void;
  zeroMask(buf: Uint8Array, out: Uint8Array): number;
  xxh64(buf: Uint8Array): bigint;
  softDirtyProbe(): SoftDirtyProbe;
  readonly zeroPageHash: bigint;
}

/** A RAM file mapped read-only by mapRam (opaque; released by unmapRam or when collected). */
export type RamMap = { readonly __ramMap: unique symbol };

/** Dirty pages with their contents, as one native pass read them (scanCopy). */
export interface DirtyPages {
  /** Dirty page frame numbers, ascending. */
  pfns: Uint32Array;
  /** One byte per pfns entry: 1 = the page is all zero (its bytes are not in `data`). */
  zero: Uint8Array;
  /** 4096 bytes for every non-zero entry, in pfns order. */
  data: Buffer;
}

/** Result of the native soft-dirty self-test (see softDirtyProbe). */
export interface SoftDirtyProbe {
  supported: boolean;
  /** errno of writing "4" to /proc/self/clear_refs (0 = accepted). */
  clearRefsErrno: number;
  /** errno of reading /proc/self/pagemap (0 = ok). */
  pagemapErrno: number;
  /** pagemap entry of a fresh page right after clear_refs (bit 55 must be clear). */
  before: bigint;
  /** ... and after writing to it (bit 55 must be set). */
  after: bigint;
}

export const NATIVE_PATH = fileURLToPath(new URL('../native/build/Release/tether_native.node', import.meta.url));

let binding: NativeBinding | undefined;

/** Loads the addon (once). Throws ERR_MEM_NATIVE_MISSING when it is not built. */
export function loadNative(): NativeBinding {
  if (binding) return binding;
  const require = createRequire(import.meta.url);
  try {
    binding = require(NATIVE_PATH) as NativeBinding;
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new TetherError(
      'ERR_MEM_NATIVE_MISSING',
      `native addon ${NATIVE_PATH} could not be loaded (${err.code ?? 'error'}: ${err.message}); ` + 'run `npm run build:native`',
      { path: NATIVE_PATH, cause: err.code },
    );
  }
  return binding;
}

/**
 * The addon's function `name`, bound to it, or undefined when the addon is not built or
 * (an older build) lacks it: for callers that have a slower path without it.
 */
export function optionalNative<F extends (...args: never[]) => unknown>(name: string): F | undefined {
  let b: NativeBinding;
  try {
    b = loadNative();
  } catch {
    return undefined; // not built: the caller's fallback
  }
  const f = (b as unknown as Record<string, unknown>)[name];
  return typeof f === 'function' ? (f.bind(b) as F) : undefined;
}

/** Whether the addon can be loaded (does not throw). */
export function nativeAvailable(): boolean {
  try {
    loadNative();
    return true;
  } catch {
    return false;
  }
}

function asTetherError(e: unknown): unknown {
  if (e instanceof Error && typeof (e as { code?: unknown }).code === 'string') {
    const ne = e as Error & { code: string; errno?: number; syscall?: string };
    if (ne.code.startsWith('ERR_MEM_') && isErrorCode(ne.code)) {
      const details: Record<string, unknown> = {};
      if (ne.errno !== undefined) details['errno'] = ne.errno;
      if (ne.syscall !== undefined) details['syscall'] = ne.syscall;
      return new TetherError(ne.code, ne.message, details);
    }
  }
  return e;
}

function call<T>(fn: (b: NativeBinding) => T): T {
  const b = loadNative();
  try {
    return fn(b);
  } catch (e) {
    throw asTetherError(e);
  }
}

/** Argument errors throw at the call (as with `call`); failures of the work reject. */
function callAsync<T>(fn: (b: NativeBinding) => Promise<T>): Promise<T> {
  return call(fn).catch((e: unknown) => {
    throw asTetherError(e);
  });
}

/**
 * Hashes every 4 KiB page of the first `pages` pages of the file into `out`
 * (8 bytes per page, little-endian XXH64 with seed 0). Holes are not read and
 * hash like a zero page. `out.length` must be exactly 8*pages. Runs off the
 * main thread; `out` must not be touched until the promise settles.
 */
export function hashFile(fd: number, pages: number, out: Uint8Array, threads?: number, map?: RamMap | null): Promise<void> {
  return callAsync((b) => b.hashFile(fd, pages, out, threads, map));
}

/**
 * Maps the first `pages` pages of the RAM file `fd` read-only, for hashFile/scanDirty/scanCopy
 * to read in place (`map` argument) instead of copying each page with pread: about half the
 * CPU per scan. Only for a file on tmpfs; null elsewhere (the calls then use pread). The file
 * must not shrink while mapped. Call unmapRam when done: a scan in flight keeps the mapping
 * until it ends.
 */
export function mapRam(fd: number, pages: number): RamMap | null {
  return call((b) => b.mapRam(fd, pages));
}

/** Releases a mapRam mapping (at once, or when the scan that reads it ends). Idempotent. */
export function unmapRam(map: RamMap): void {
  call((b) => b.unmapRam(map));
}

/**
 * For every allocated (non-hole) page of the file — restricted to `candidates`
 * when given — compares the page's hash with `table[pfn]`; differing pages are
 * returned (ascending) and their table entries updated. Holes are never read.
 * Runs off the main thread; `table` must not be touched until the promise settles.
 */
export function scanDirty(
  fd: number,
  pages: number,
  table: Uint8Array,
  candidates: Uint32Array | null = null,
  threads?: number,
  map?: RamMap | null,
): Promise<Uint32Array> {
  return callAsync((b) => b.scanDirty(fd, pages, table, candidates, threads, map));
}

/**
 * scanDirty, and in the same pass the bytes of every dirty page (the very bytes that were
 * hashed into the table): one read of each page instead of a scan and then a re-read. Zero
 * pages are flagged, not copied. Runs off the main thread like scanDirty.
 * `delayMs` is fault injection only (TETHER_FAULTS slow-scan-ms): the job first sleeps that
 * long on the worker thread that then runs the scan's first share, as the scan of a very
 * large RAM would take; the JS thread is as free as during a real scan.
 */
export function scanCopy(
  fd: number,
  pages: number,
  table: Uint8Array,
  candidates: Uint32Array | null = null,
  threads?: number,
  map?: RamMap | null,
  delayMs?: number,
): Promise<DirtyPages> {
  return callAsync((b) => b.scanCopy(fd, pages, table, candidates, threads, map, delayMs));
}

/** The 8-byte hash of each 4 KiB page of `buf` (length a multiple of 4096). */
export function hashBuffer(buf: Uint8Array): Buffer {
  return call((b) => b.hashBuffer(buf));
}

/** Reads page `pfns[i]` into `out[4096*i ..]`, coalescing contiguous pfns into one pread. */
export function readPages(fd: number, pfns: Uint32Array, out: Uint8Array): void {
  call((b) => b.readPages(fd, pfns, out));
}

/** Sets `out[i]` to 1 when page i of `buf` is all zero, else 0; returns the number of zero pages. */
export function zeroMask(buf: Uint8Array, out: Uint8Array): number {
  return call((b) => b.zeroMask(buf, out));
}

/** XXH64 (seed 0) of the whole buffer. */
export function xxh64(buf: Uint8Array): bigint {
  return call((b) => b.xxh64(buf));
}

/**
 * Functional soft-dirty self-test on this process: clear_refs=4, write a page,
 * check pagemap bit 55. A kernel without CONFIG_MEM_SOFT_DIRTY may accept the
 * clear_refs write without error and never set the bit (this machine does).
 */
export function softDirtyProbe(): SoftDirtyProbe {
  return call((b) => b.softDirtyProbe());
}

/** The hash every hole / all-zero page has. */
export function zeroPageHash(): bigint {
  return loadNative().zeroPageHash;
}

/** The wrapped functions as one object (`native.readPages(...)`). */
export const native = {
  hashFile,
  scanDirty,
  scanCopy,
  mapRam,
  unmapRam,
  hashBuffer,
  readPages,
  zeroMask,
  xxh64,
  softDirtyProbe,
  zeroPageHash,
  PAGE_SIZE,
} as const;
