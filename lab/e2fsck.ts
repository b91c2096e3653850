/** The file-system check of an ext4 disk image a migrated guest left behind. */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';

/**
 * `e2fsck -fn` as after a crash: the guest stopped without unmounting, so its ext4
 * journal is replayed first (on a copy; the image itself is left as the VM left it).
 * Returns e2fsck's exit code and output.
 */
export function e2fsck(image: string): { code: number; output: string } {
  const copy = `${image}.fsck`;
  fs.copyFileSync(image, copy);
  try {
    spawnSync('e2fsck', ['-E', 'journal_only', '-p', copy], { encoding: 'utf8' });
    const r = spawnSync('e2fsck', ['-fn', copy], { encoding: 'utf8' });
    return { code: r.status ?? -1, output: `${r.stdout}${r.stderr}` };
  } finally {
    fs.rmSync(copy, { force: true });
  }
}
