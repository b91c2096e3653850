/**
 * Dirty-page tracking on D (docs/design.md "Dirty pages on D"): which pages the
 * guest wrote since the previous checkpoint, compared against S's copy through
 * an 8-byte-per-page hash table that S sends before the first checkpoint. This file
 * picks the tracker (createTracker); the trackers (scan.ts, soft-dirty.ts) implement
 * dirty-tracker.ts and never import each other or this file.
 *
 * Both trackers read only what SEEK_DATA reports as data in the RAM file (mapped
 * read-only on tmpfs, else pread: a fault on a hole through the mapping would fill it
 * behind post-copy's back) and never report a hole.
 */
import { TetherError } from '../errors.ts';
import { softDirtyProbe, type SoftDirtyProbe } from '../native.ts';
import { ScanTracker } from './scan.ts';
import { SoftDirtyTracker } from './soft-dirty.ts';
import type { DirtyTracker, TrackerKind, TrackerOptions } from './dirty-tracker.ts';

/**
 * Whether soft-dirty tracking works on this kernel, probed on the sidecar's
 * own process. Writing "4" to clear_refs is not enough of a test: a kernel
 * built without CONFIG_MEM_SOFT_DIRTY (like this machine's) accepts it and
 * never sets bit 55, so the probe also writes a page and checks the bit.
 */
export async function softDirtySupported(): Promise<boolean> {
  return (await softDirtyStatus()).supported;
}

export async function softDirtyStatus(): Promise<SoftDirtyProbe> {
  return softDirtyProbe();
}

export async function createTracker(kind: 'auto' | TrackerKind, opts: TrackerOptions): Promise<DirtyTracker> {
  switch (kind) {
    case 'scan':
      return ScanTracker.open(opts, 'configured: scan');
    case 'soft-dirty': {
      const probe = await softDirtyStatus();
      if (!probe.supported) {
        throw new TetherError('ERR_MEM_SOFTDIRTY_UNSUPPORTED', `soft-dirty tracking does not work on this kernel`, {
          clearRefsErrno: probe.clearRefsErrno,
          pagemapErrno: probe.pagemapErrno,
        });
      }
      return SoftDirtyTracker.open(opts, 'configured: soft-dirty');
    }
    case 'auto': {
      const probe = await softDirtyStatus();
      if (!probe.supported) {
        const why =
          probe.clearRefsErrno !== 0
            ? `clear_refs rejected (errno ${probe.clearRefsErrno})`
            : probe.pagemapErrno !== 0
              ? `pagemap unreadable (errno ${probe.pagemapErrno})`
              : 'kernel never sets the soft-dirty bit (CONFIG_MEM_SOFT_DIRTY off)';
        return ScanTracker.open(opts, `auto: soft-dirty unavailable: ${why}`);
      }
      try {
        return await SoftDirtyTracker.open(opts, 'auto: soft-dirty supported');
      } catch (e) {
        const msg = e instanceof Error ? e.message : String(e);
        if (e instanceof TetherError && (e.code === 'ERR_MEM_RAM_FILE' || e.code === 'ERR_MEM_RAM_SIZE')) throw e;
        return ScanTracker.open(opts, `auto: soft-dirty failed to start (${msg})`);
      }
    }
    default:
      throw new TetherError('ERR_MEM_TRACKER_KIND', `unknown dirty tracker kind ${String(kind)}`);
  }
}
