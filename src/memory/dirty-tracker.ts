/**
 * What every dirty-page tracker (scan.ts, soft-dirty.ts) implements and is built from;
 * tracker.ts picks one. Apart from tracker.ts so the trackers never import their selector.
 */
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
