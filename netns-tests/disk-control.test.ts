/**
 * CONTROL for disk output commit: the kill -9 rollback scenario with the
 * destination's journal forced to write through (TETHER_FAULTS=journal-write-through).
 * The destination then writes the shared image during the window, so after the
 * rollback the disk holds writes of epochs the source never acknowledged while
 * the guest's memory is that of the acknowledged checkpoint: diskcheck MUST
 * report a mismatch. If it does not, the disk scenarios prove nothing.
 */
import t from 'tap';
import { diskcheck, fileSize, waitDiskPasses } from './harness.ts';
import { bootDiskCluster, waitApplied } from './scenarios.ts';

t.test('journal forced to write through: diskcheck detects the split disk after a rollback', async (t) => {
  const c = await bootDiskCluster(t, { disk: { guest: 'diskcheck' }, faults: { destination: 'journal-write-through' } });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
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
