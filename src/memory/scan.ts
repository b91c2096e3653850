/**
 * `scan` dirty tracking: every collect hashes every allocated page of the RAM
 * file and compares it with the table (S's view of each page). Works on any
 * kernel; cost grows with allocated RAM, not with dirty pages.
 */
import type { FileHandle } from 'node:fs/promises';
import { mapRam, scanCopy, scanDirty, unmapRam, type DirtyPages, type RamMap } from '../native.ts';
import { openRam, ramPages } from './ram.ts';
import { TrackerState, type DirtyTracker, type TrackerOptions } from './dirty-tracker.ts';

export class ScanTracker implements DirtyTracker {
  readonly kind = 'scan' as const;
  readonly reason: string;
  private readonly state = new TrackerState('scan');

  private constructor(
    private readonly fh: FileHandle,
    readonly pages: number,
    private readonly threads: number | undefined,
    reason: string,
    /** The RAM file mapped for the tracker's life (tmpfs), or null: scans pread. */
    private readonly map: RamMap | null,
  ) {
    this.reason = reason;
  }

  static async open(opts: TrackerOptions, reason = 'requested'): Promise<ScanTracker> {
    const pages = ramPages(opts.ramBytes);
    const fh = await openRam(opts.ramPath, opts.ramBytes);
    let map: RamMap | null;
    try {
      map = mapRam(fh.fd, pages);
    } catch (e) {
      await fh.close();
      throw e;
    }
    return new ScanTracker(fh, pages, opts.threads, reason, map);
  }

  /** Whether scans read the RAM file through a mapping (else pread). */
  get mapped(): boolean {
    return this.map !== null;
  }

  /**
   * Takes ownership of `table` (8 bytes per page, S's hashes): it is updated in
   * place by every collect and so always describes S's copy after the last checkpoint.
   */
  async start(table: Buffer): Promise<void> {
    this.state.setTable(table, this.pages);
  }

  async collect(): Promise<Uint32Array> {
    const table = this.state.started();
    return await scanDirty(this.fh.fd, this.pages, table, null, this.threads, this.map);
  }

  async collectPages(opts?: { faultDelayMs?: number }): Promise<DirtyPages> {
    const table = this.state.started();
    return await scanCopy(this.fh.fd, this.pages, table, null, this.threads, this.map, opts?.faultDelayMs);
  }

  async close(): Promise<void> {
    if (this.state.closed) return;
    this.state.closed = true;
    if (this.map) unmapRam(this.map);
    await this.fh.close();
  }
}
