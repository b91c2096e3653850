/**
 * `soft-dirty` dirty tracking: the kernel marks every PTE the guest writes
 * (pagemap bit 55); we read the bits over QEMU's mapping of the RAM file,
 * clear them (clear_refs = 4), and confirm the candidates against the hash
 * table with scanDirty (pages post-copy placed are soft-dirty too but equal S's copy).
 *
 * collect() must run with the VM paused: a write between reading pagemap and
 * clearing the bits would otherwise be lost.
 *
 * The first collect after start() scans the whole file instead: writes made
 * before the tracker existed carry no soft-dirty guarantee. The bits are cleared
 * before that scan, so nothing falls between the two.
 *
 * Reclaim: a shmem page written, then reclaimed to swap and faulted back by a read before
 * the next collect comes back present and clean (its PTE, which held the bit, was zapped;
 * docs/lab.md shows it on Debian's 6.1 kernel). So open() refuses (ERR_MEM_SOFTDIRTY_RECLAIM)
 * while swap is on and QEMU's mapping of the RAM file is not mlocked (VmFlags "lo", e.g.
 * QEMU's -overcommit mem-lock=on), and a collect that finds swap switched on since then
 * scans the whole file instead (stats.fullScans).
 *
 * Collapse: the same happens to a small page khugepaged (or MADV_COLLAPSE) collapses into a
 * huge page: the PTE table goes, the huge page is mapped clean at the next fault (docs/lab.md,
 * shown with MADV_COLLAPSE on 6.1). So open() also refuses (ERR_MEM_SOFTDIRTY_THP) a RAM
 * mapping smaps calls THP-eligible (a tmpfs mounted huge=always/within_size/advise with
 * QEMU's MADV_HUGEPAGE, or shmem_enabled=force); /dev/shm's default huge=never passes.
 */
import { open, readFile, realpath, writeFile } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { TetherError } from '../errors.ts';
import { scanCopy, scanDirty, type DirtyPages } from '../native.ts';
import { collectCandidates, findRamSegments, parseMapsLine, type RamSegment } from './pagemap.ts';
import { openRam, ramPages } from './ram.ts';
import { TrackerState, type DirtyTracker, type TrackerOptions } from './dirty-tracker.ts';

/** Pagemap bytes read per pread (1 Mi pages). */
const PAGEMAP_CHUNK = 8 * 1024 * 1024;

/**
 * A /proc text file read to its end. procfs answers seq files a page per read(); Node 18's
 * fs.promises.readFile took the first short read for the end (seen in the lab guest with
 * Debian's nodejs: smaps cut after 4 KiB), so read until a read returns nothing.
 */
async function readProcFile(path: string): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const chunks: Buffer[] = [];
    for (;;) {
      const buf = Buffer.allocUnsafe(65536);
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      chunks.push(buf.subarray(0, bytesRead));
    }
    return Buffer.concat(chunks).toString('utf8');
  } finally {
    await fh.close();
  }
}

export class SoftDirtyTracker implements DirtyTracker {
  readonly kind = 'soft-dirty' as const;
  readonly reason: string;
  private readonly state = new TrackerState('soft-dirty');
  private first = true;
  private readonly procDir: string;
  private chunk: Buffer | undefined;

  /** Counters for status/metrics. */
  readonly stats = { collects: 0, lastCandidates: 0, lastDirty: 0, fullScans: 0 };
  /** Whether QEMU's mapping of the RAM file is mlocked (read from smaps when swap is first seen on). */
  private locked: boolean | undefined;

  private constructor(
    private readonly opts: TrackerOptions,
    private readonly ram: FileHandle,
    private readonly pagemap: FileHandle,
    private readonly inode: number,
    /** The RAM file's canonical path, as the kernel prints it in maps. */
    private readonly mapPath: string,
    readonly pages: number,
    reason: string,
  ) {
    this.procDir = `${opts.procRoot ?? '/proc'}/${opts.qemuPid}`;
    this.reason = reason;
  }

  static async open(opts: TrackerOptions, reason = 'requested'): Promise<SoftDirtyTracker> {
    const pages = ramPages(opts.ramBytes);
    if (!Number.isInteger(opts.qemuPid) || opts.qemuPid <= 0) {
      throw new TetherError('ERR_MEM_SOFTDIRTY_PID', `invalid QEMU pid ${opts.qemuPid}`);
    }
    const procDir = `${opts.procRoot ?? '/proc'}/${opts.qemuPid}`;
    const ram = await openRam(opts.ramPath, opts.ramBytes);
    let pagemap: FileHandle | undefined;
    try {
      try {
        pagemap = await open(`${procDir}/pagemap`, 'r');
      } catch (e) {
        const err = e as NodeJS.ErrnoException;
        throw new TetherError('ERR_MEM_SOFTDIRTY_PID', `cannot open ${procDir}/pagemap: ${err.message}`, {
          errno: err.errno,
        });
      }
      const mapPath = await realpath(opts.ramPath);
      const t = new SoftDirtyTracker(opts, ram, pagemap, (await ram.stat()).ino, mapPath, pages, reason);
      await t.segments(); // fail now, not at the first checkpoint, if QEMU doesn't map the file
      if (!opts.skipPreconditions && (await t.ramMappingFlags()).thpEligible) {
        throw new TetherError(
          'ERR_MEM_SOFTDIRTY_THP',
          `${procDir}'s mapping of ${mapPath} is THP-eligible: a page khugepaged collapses loses its soft-dirty bit`,
          { qemuPid: opts.qemuPid, ramPath: opts.ramPath },
        );
      }
      if (!opts.skipPreconditions && (await t.reclaimable())) {
        throw new TetherError(
          'ERR_MEM_SOFTDIRTY_RECLAIM',
          `swap is on and ${procDir}'s mapping of ${mapPath} is not mlocked: a reclaimed page would lose its soft-dirty bit`,
          { qemuPid: opts.qemuPid, ramPath: opts.ramPath },
        );
      }
      return t;
    } catch (e) {
      await pagemap?.close();
      await ram.close();
      throw e;
    }
  }

  /** Takes ownership of `table`; see ScanTracker.start. */
  async start(table: Buffer): Promise<void> {
    this.state.setTable(table, this.pages);
    this.first = true;
  }

  async collect(): Promise<Uint32Array> {
    return this.#collect(
      (fd, pages, table, cand, threads) => scanDirty(fd, pages, table, cand, threads),
      (d) => d.length,
    );
  }

  async collectPages(opts?: { faultDelayMs?: number }): Promise<DirtyPages> {
    return this.#collect(
      (fd, pages, table, cand, threads) => scanCopy(fd, pages, table, cand, threads, null, opts?.faultDelayMs),
      (d) => d.pfns.length,
    );
  }

  async #collect<T>(
    scan: (fd: number, pages: number, table: Buffer, candidates: Uint32Array | null, threads?: number) => Promise<T>,
    count: (d: T) => number,
  ): Promise<T> {
    const table = this.state.started();
    this.stats.collects++;
    const reclaimable = !this.first && !this.opts.skipPreconditions && (await this.reclaimable());
    if (this.first || reclaimable) {
      if (reclaimable) this.stats.fullScans++;
      await this.clearRefs();
      const dirty = await scan(this.ram.fd, this.pages, table, null, this.opts.threads);
      this.first = false;
      this.stats.lastCandidates = this.pages;
      this.stats.lastDirty = count(dirty);
      return dirty;
    }
    const candidates = await this.readCandidates();
    await this.clearRefs();
    const dirty = await scan(this.ram.fd, this.pages, table, candidates, this.opts.threads);
    this.stats.lastCandidates = candidates.length;
    this.stats.lastDirty = count(dirty);
    return dirty;
  }

  async close(): Promise<void> {
    if (this.state.closed) return;
    this.state.closed = true;
    await this.pagemap.close();
    await this.ram.close();
  }

  /**
   * Whether a RAM page could be reclaimed behind the tracker's back: swap on (a tmpfs page
   * has nowhere else to go) and the RAM mapping not mlocked. /proc/swaps is read every time
   * (small); smaps, which walks QEMU's page tables, once, when swap is first seen on.
   */
  private async reclaimable(): Promise<boolean> {
    let swaps: string;
    try {
      swaps = await readFile(`${this.opts.procRoot ?? '/proc'}/swaps`, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false; // CONFIG_SWAP off
      throw new TetherError('ERR_MEM_IO', `cannot read /proc/swaps: ${(e as Error).message}`);
    }
    if (swaps.trim().split('\n').length <= 1) return false; // the header only
    this.locked ??= (await this.ramMappingFlags()).locked;
    return !this.locked;
  }

  /**
   * From smaps, over every mapping of the RAM file in QEMU: all VM_LOCKED (VmFlags "lo"),
   * and whether any is THP-eligible ("THPeligible: 1": khugepaged may collapse it).
   */
  async ramMappingFlags(): Promise<{ locked: boolean; thpEligible: boolean; mappings: number }> {
    let smaps: string;
    try {
      smaps = await readProcFile(`${this.procDir}/smaps`);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new TetherError('ERR_MEM_SOFTDIRTY_PID', `cannot read ${this.procDir}/smaps: ${err.message}`, {
        errno: err.errno,
      });
    }
    let inRam = false;
    let mappings = 0;
    let locked = true;
    let thpEligible = false;
    for (const line of smaps.split('\n')) {
      const vma = parseMapsLine(line);
      if (vma) {
        inRam = vma.path === this.mapPath && vma.inode === this.inode && vma.perms[3] === 's';
        if (inRam) mappings++;
      } else if (inRam && line.startsWith('VmFlags:')) {
        if (!line.slice(8).trim().split(/\s+/).includes('lo')) locked = false;
      } else if (inRam && /^THPeligible:\s*1\b/.test(line)) {
        thpEligible = true;
      }
    }
    return { locked: locked && mappings > 0, thpEligible, mappings };
  }

  /** Current mapping of the RAM file in QEMU (re-read each time: cheap, and robust to VMA changes). */
  private async segments(): Promise<RamSegment[]> {
    let maps: string;
    try {
      maps = await readProcFile(`${this.procDir}/maps`);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new TetherError('ERR_MEM_SOFTDIRTY_PID', `cannot read ${this.procDir}/maps: ${err.message}`, {
        errno: err.errno,
      });
    }
    return findRamSegments(maps, this.mapPath, this.pages, this.inode);
  }

  private async readCandidates(): Promise<Uint32Array> {
    const segs = await this.segments();
    let total = 0;
    for (const s of segs) total += s.pages;
    const out = new Uint32Array(total);
    let pos = 0;
    const chunk = (this.chunk ??= Buffer.allocUnsafe(PAGEMAP_CHUNK));
    for (const s of segs) {
      let done = 0;
      while (done < s.pages) {
        const n = Math.min(s.pages - done, PAGEMAP_CHUNK / 8);
        const want = n * 8;
        const position = Number((s.vpage + BigInt(done)) * 8n);
        let got = 0;
        while (got < want) {
          const { bytesRead } = await this.pagemap.read(chunk, got, want - got, position + got);
          if (bytesRead === 0) {
            throw new TetherError('ERR_MEM_IO', `short read of ${this.procDir}/pagemap at ${position + got}`);
          }
          got += bytesRead;
        }
        pos = collectCandidates(chunk.subarray(0, want), s.filePage + done, out, pos);
        done += n;
      }
    }
    return out.subarray(0, pos);
  }

  private async clearRefs(): Promise<void> {
    try {
      await writeFile(`${this.procDir}/clear_refs`, '4');
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new TetherError('ERR_MEM_SOFTDIRTY_CLEAR', `cannot clear soft-dirty bits of ${this.procDir}: ${err.message}`, {
        errno: err.errno,
      });
    }
  }
}
