/**
 * What every dirty-page tracker (scan.ts, soft-dirty.ts) implements and is built from:
 * the contract, its options and the start/closed state both keep. select.ts picks one;
 * the trackers import this file only, never each other or their selector.
 */
import { TetherError } from '../errors.ts';
import type { DirtyPages } from '../native.ts';

export type TrackerKind = 'scan' | 'soft-dirty';

export interface DirtyTracker {
  readonly kind: TrackerKind;
  /** Why this kind runs (e.g. "auto: soft-dirty not supported by the kernel"). */
  readonly reason?: string;
  /**
   * Called once with S's hash table before the first checkpoint. The tracker
   * takes ownership of the table and updates it in place on every collect.
   */
  start(table: Buffer): Promise<void>;
  /** While the VM is paused: dirty pfns since the previous collect (ascending), with the table updated. */
  collect(): Promise<Uint32Array>;
  /**
   * As collect(), with the dirty pages' bytes read in the same pass (the checkpoint's
   * PAGES payload): call it instead of collect(), not after it. `faultDelayMs`: fault
   * injection only (slow-scan-ms), a sleep inside the native scan job.
   */
  collectPages(opts?: { faultDelayMs?: number }): Promise<DirtyPages>;
  close(): Promise<void>;
}

export interface TrackerOptions {
  /** Guest RAM file (tmpfs), as given to QEMU's memory-backend-file mem-path. */
  ramPath: string;
  /** Guest RAM size in bytes (multiple of 4096). */
  ramBytes: number;
  /** QEMU's pid (soft-dirty reads its /proc entries). */
  qemuPid: number;
  /** Threads for hashing (default 2). */
  threads?: number;
  /** For tests: where proc is mounted (default /proc). */
  procRoot?: string;
  /**
   * The lab only (tools/lab/lab.ts, to show what the checks prevent): open soft-dirty although
   * swap is on and the RAM is not mlocked, or the RAM mapping is THP-eligible.
   */
  skipPreconditions?: boolean;
}

/** The hash table's size check: 8 bytes per page. */
export function checkTable(table: Buffer, pages: number): void {
  if (!Buffer.isBuffer(table) || table.length !== pages * 8) {
    throw new TetherError(
      'ERR_MEM_TABLE_SIZE',
      `hash table must be a Buffer of 8 bytes per page (${pages * 8}), got ${Buffer.isBuffer(table) ? table.length : typeof table}`,
      { pages },
    );
  }
}

/** A tracker's table and open/closed state, with the checks every call makes. */
export class TrackerState {
  table: Buffer | undefined;
  closed = false;
  constructor(readonly kind: string) {}

  setTable(table: Buffer, pages: number): void {
    this.ensureOpen();
    if (this.table) throw new TetherError('ERR_MEM_TRACKER_STATE', `${this.kind} tracker already started`);
    checkTable(table, pages);
    this.table = table;
  }

  started(): Buffer {
    this.ensureOpen();
    if (!this.table) throw new TetherError('ERR_MEM_TRACKER_STATE', `${this.kind} tracker: collect() before start()`);
    return this.table;
  }

  ensureOpen(): void {
    if (this.closed) throw new TetherError('ERR_MEM_TRACKER_STATE', `${this.kind} tracker is closed`);
  }
}
