/**
 * CONTROL for disk output commit: the kill -9 rollback scenario with the
 * destination's journal forced to write through (TETHER_FAULTS=journal-write-through).
 * The destination then writes the shared image during the window, so after the
 * rollback the disk holds writes of epochs the source never acknowledged while
 * the guest's memory is that of the acknowledged checkpoint: diskcheck MUST
 * report a mismatch. If it does not, the disk scenarios prove nothing. Same
 * scenario as the kill -9 one in disk.test.ts (1 s checkpoint interval).
 */
import fs from 'node:fs';
import t from 'tap';
import { diskcheck, fileSize, waitDiskPasses, waitFor } from './harness.ts';
import { bootDiskCluster, waitApplied } from './scenarios.ts';

t.test('journal forced to write through: diskcheck detects the split disk after a rollback', async (t) => {
  const c = await bootDiskCluster(t, {
    disk: { guest: 'diskcheck' },
    vm: { intervalMs: 1000 },
    faults: { destination: 'journal-write-through' },
  });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  // The guest is writing on the destination (a pass completed there since switchover).
  await waitDiskPasses(c.serialLog(c.dst), 0, 1, 'on the destination');
  // Kill while the destination writes the image (its writes go straight through):
  // with a 1 s checkpoint interval the epoch that dies with it holds writes.
  const mtime = fs.statSync(c.diskImage).mtimeMs;
  await waitFor(() => fs.statSync(c.diskImage).mtimeMs !== mtime, 'the destination writing the shared image');
  const d = await c.status(c.dst);
  process.kill(d.pid, 'SIGKILL');
  const mig = await migrating;
  t.equal(mig.result?.outcome, 'rolled-back', `rolled back: ${mig.stderr.slice(-1000)}`);
  const from = fileSize(c.serialLog(c.src));
  const rep = await waitDiskPasses(c.serialLog(c.src), from, 2, 'on the source after rollback');
  const all = diskcheck(c.serialLog(c.src)).mismatch;
  t.ok(rep.mismatch.length > 0 || all.length > 0, `diskcheck reports the mismatch: ${all.slice(0, 3).join(' | ')}`);
  t.match(all.join('\n'), /diskcheck MISMATCH block=\d+ expected_seq=\d+ found_seq=\d+/, 'a block holds a write the memory never made');
});
