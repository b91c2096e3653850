/**
 * Pure decoding of /proc/<pid>/maps and /proc/<pid>/pagemap
 * (Documentation/admin-guide/mm/pagemap.rst).
 */
import { TetherError } from '../errors.ts';
import { PAGE_SIZE } from '../native.ts';

export const PM_PFN_MASK = (1n << 55n) - 1n;
export const PM_SOFT_DIRTY = 1n << 55n;
export const PM_EXCLUSIVE = 1n << 56n;
export const PM_FILE = 1n << 61n;
export const PM_SWAP = 1n << 62n;
export const PM_PRESENT = 1n << 63n;

export interface PagemapEntry {
  present: boolean;
  swapped: boolean;
  softDirty: boolean;
  exclusive: boolean;
  file: boolean;
  /** Physical frame (bits 0-54) when present; swap type/offset bits when swapped; 0 without CAP_SYS_ADMIN. */
  pfn: bigint;
}

export function decodePagemapEntry(v: bigint): PagemapEntry {
  return {
    present: (v & PM_PRESENT) !== 0n,
    swapped: (v & PM_SWAP) !== 0n,
    softDirty: (v & PM_SOFT_DIRTY) !== 0n,
    exclusive: (v & PM_EXCLUSIVE) !== 0n,
    file: (v & PM_FILE) !== 0n,
    pfn: v & PM_PFN_MASK,
  };
}

export function encodePagemapEntry(e: Partial<PagemapEntry>): bigint {
  let v = (e.pfn ?? 0n) & PM_PFN_MASK;
  if (e.present) v |= PM_PRESENT;
  if (e.swapped) v |= PM_SWAP;
  if (e.softDirty) v |= PM_SOFT_DIRTY;
  if (e.exclusive) v |= PM_EXCLUSIVE;
  if (e.file) v |= PM_FILE;
  return v;
}

/**
 * Pages of a pagemap slice that may have been written since soft-dirty bits
 * were last cleared. `entries` is the raw pagemap (8 bytes per page, little-
 * endian) for consecutive virtual pages; returned numbers are `base + index`.
 *
 * A page is a candidate when it is soft-dirty, swapped (bit 62; includes
 * migration entries), or not present at all. The last rule keeps us from
 * missing writes whose PTE was zapped afterwards (reclaim of a shmem page, a
 * madvise(DONTNEED) by QEMU): the soft-dirty bit lives in the PTE and goes with
 * it. Non-present pages that are holes in the RAM file cost nothing later
 * (scanDirty skips holes), and post-copy placed pages are present.
 * Only a present, clean page is ruled out.
 */
export function pagemapCandidates(entries: Uint8Array, base: number): Uint32Array {
  const out = new Uint32Array(Math.floor(entries.length / 8));
  return out.subarray(0, collectCandidates(entries, base, out, 0));
}

/** pagemapCandidates writing into `out` from `pos`; returns the new end position. */
export function collectCandidates(entries: Uint8Array, base: number, out: Uint32Array, pos: number): number {
  if (entries.length % 8 !== 0) {
    throw new TetherError('ERR_MEM_PAGEMAP', `pagemap slice of ${entries.length} bytes is not a multiple of 8`);
  }
  const n = entries.length / 8;
  if (out.length - pos < n) {
    throw new TetherError('ERR_MEM_PAGEMAP', `candidate buffer too small: ${out.length - pos} < ${n}`);
  }
  for (let i = 0; i < n; i++) {
    const b6 = entries[i * 8 + 6]!; // bits 48-55: bit 55 = soft-dirty
    const b7 = entries[i * 8 + 7]!; // bits 56-63: 62 = swapped, 63 = present
    // candidate unless present && !swapped && !soft-dirty
    if ((b6 & 0x80) !== 0 || (b7 & 0xc0) !== 0x80) out[pos++] = base + i;
  }
  return pos;
}

export interface MapsLine {
  start: bigint;
  end: bigint;
  perms: string;
  /** File offset of `start`. */
  offset: bigint;
  dev: string;
  inode: number;
  /** Path, pseudo-name like "[heap]", or "" for anonymous; " (deleted)" kept. */
  path: string;
}

const MAPS_RE = /^([0-9a-f]+)-([0-9a-f]+)\s+(\S{4})\s+([0-9a-f]+)\s+([0-9a-f]+:[0-9a-f]+)\s+(\d+)(?:\s+(.*))?$/i;

/** Parses one line of /proc/<pid>/maps; returns undefined for a malformed line. */
export function parseMapsLine(line: string): MapsLine | undefined {
  const m = MAPS_RE.exec(line.replace(/\n$/, ''));
  if (!m) return undefined;
  return {
    start: BigInt('0x' + m[1]!),
    end: BigInt('0x' + m[2]!),
    perms: m[3]!,
    offset: BigInt('0x' + m[4]!),
    dev: m[5]!,
    inode: Number(m[6]!),
    path: m[7] ?? '',
  };
}

export function parseMaps(text: string): MapsLine[] {
  const out: MapsLine[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    const l = parseMapsLine(line);
    if (l) out.push(l);
  }
  return out;
}

/** A run of RAM file pages [filePage, filePage+pages) mapped at virtual page `vpage`. */
export interface RamSegment {
  filePage: number;
  pages: number;
  /** Virtual address >> 12 (index into /proc/<pid>/pagemap). */
  vpage: bigint;
}

/**
 * Where the RAM file is mapped in a process: every shared mapping whose path is
 * `ramPath` (and, when given, whose inode is `inode`), clipped to the first
 * `ramPages` file pages, sorted by file page. Throws ERR_MEM_SOFTDIRTY_MAPPING
 * when some file page is not mapped (a write there could not be observed).
 */
export function findRamSegments(maps: MapsLine[] | string, ramPath: string, ramPages: number, inode?: number): RamSegment[] {
  const lines = typeof maps === 'string' ? parseMaps(maps) : maps;
  const page = BigInt(PAGE_SIZE);
  const segs: RamSegment[] = [];
  for (const l of lines) {
    if (l.path !== ramPath) continue;
    if (inode !== undefined && l.inode !== inode) continue;
    if (l.perms[3] !== 's') continue; // private mappings are not the guest RAM QEMU shares
    const first = l.offset / page;
    if (first >= BigInt(ramPages)) continue;
    let pages = (l.end - l.start) / page;
    if (first + pages > BigInt(ramPages)) pages = BigInt(ramPages) - first;
    segs.push({ filePage: Number(first), pages: Number(pages), vpage: l.start / page });
  }
  segs.sort((a, b) => a.filePage - b.filePage);
  // The same file page may be mapped more than once (then all mappings are read);
  // what matters is that none is left out.
  let covered = 0;
  for (const s of segs) {
    if (s.filePage > covered) break;
    covered = Math.max(covered, s.filePage + s.pages);
  }
  if (covered < ramPages) {
    throw new TetherError(
      'ERR_MEM_SOFTDIRTY_MAPPING',
      segs.length === 0
        ? `no shared mapping of ${ramPath} in the process`
        : `RAM file pages from ${covered} of ${ramPages} are not mapped by the process`,
      { ramPath, covered, ramPages },
    );
  }
  return segs;
}
