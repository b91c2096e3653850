/**
 * The switch of a running QEMU's disk from the sidecar's NBD export onto its own file node
 * (docs/disk.md, "The switch"): blockdev-add the file node f0, blockdev-reopen the raw node
 * disk0 onto it (the reopen drains disk0 first, so every request on nbd0 has completed before
 * the first one reaches f0), then blockdev-del nbd0. The caller guarantees the order around it.
 */
import { ignored, type Logger } from '../util/log.ts';
import { FILE_NODE, NBD_NODE, fileNodeOptions, rawNodeOptions } from './cmdline.ts';
import { blockdevAdd, blockdevDel, blockdevReopen, type QmpExecutor } from './commands.ts';

/**
 * Moves disk0 onto a file node on `image`; returns the reopen's duration in ms (the guest's
 * I/O is held by the drain meanwhile). On a failed reopen the file node is removed again, the
 * disk stays on NBD and the reopen's error is thrown.
 */
export async function switchDiskToFile(qmp: QmpExecutor, image: string, log: Logger): Promise<number> {
  await blockdevAdd(qmp, fileNodeOptions(image));
  const t0 = performance.now();
  try {
    await blockdevReopen(qmp, [rawNodeOptions(FILE_NODE)]);
  } catch (e) {
    // the reopen's error is what the caller must see; the file node is unused either way
    await blockdevDel(qmp, FILE_NODE).catch(ignored(log, `removing the unused file node ${FILE_NODE} after a failed reopen`));
    throw e;
  }
  const reopenMs = performance.now() - t0;
  await blockdevDel(qmp, NBD_NODE);
  return reopenMs;
}
