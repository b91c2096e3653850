/**
 * CONTROL for disk output commit: the kill -9 rollback scenario with the
 * destination's journal forced to write through (TETHER_FAULTS=journal-write-through).
 * The destination then writes the shared image during the window, so after the
 * rollback the disk holds writes of epochs the source never acknowledged while
 * the guest's memory is that of the acknowledged checkpoint: diskcheck MUST
 * report a mismatch. If it does not, the disk scenarios prove nothing. Same
 * scenario as the kill -9 one in disk.test.ts (1 s checkpoint interval).
 *
 * The epochs that die with the destination hold writes whatever the machine's speed
 * (killDuringDiskHold in scenarios.ts): the image holds at least one pass of writes
 * made after the checkpoint the source resumes from.
 */
import t from 'tap';
import { diskcheck, waitDiskPasses } from '../lab/serial.ts';
import { fileSize } from '../lab/proc.ts';
import { bootDiskCluster, DISK_HOLD, killDuringDiskHold } from './scenarios.ts';

t.test('journal forced to write through: diskcheck detects the split disk after a rollback', async (t) => {
  const c = await bootDiskCluster(t, {
    disk: { guest: 'diskcheck' },
    vm: DISK_HOLD.vm,
    faults: { destination: 'journal-write-through', source: DISK_HOLD.source },
    holdCompletion: true,
  });
  const { mig, held } = await killDuringDiskHold(t, c);
  t.equal(mig.result?.outcome, 'rolled-back', `rolled back: ${mig.stderr.slice(-1000)}`);
  t.equal(mig.result?.rollback?.epoch, held, `resumed from the held checkpoint ${held}`);
  const from = fileSize(c.serialLog(c.src));
  const rep = await waitDiskPasses(c.serialLog(c.src), from, 2, 'on the source after rollback');
  const all = diskcheck(c.serialLog(c.src)).mismatch;
  t.ok(rep.mismatch.length > 0 || all.length > 0, `diskcheck reports the mismatch: ${all.slice(0, 3).join(' | ')}`);
  t.match(all.join('\n'), /diskcheck MISMATCH block=\d+ expected_seq=\d+ found_seq=\d+/, 'a block holds a write the memory never made');
});
