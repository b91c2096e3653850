/**
 * CONTROL for disk output commit: the kill -9 rollback scenario with the
 * destination's journal forced to write through (TETHER_FAULTS=journal-write-through).
 * The destination then writes the shared image during the window, so after the
 * rollback the disk holds writes of epochs the source never acknowledged while
 * the guest's memory is that of the acknowledged checkpoint: diskcheck MUST
 * report a mismatch. If it does not, the disk scenarios prove nothing. Same
 * scenario as the kill -9 one in disk.test.ts (1 s checkpoint interval).
 *
 * The epochs that die with the destination must hold writes, whatever the machine's
 * speed: the source holds the ACK of one checkpoint (hold-acks-trigger), so it applies
 * nothing after it, and the kill comes only once the destination's guest has completed
 * a diskcheck pass that began after that checkpoint was applied. The source resumes
 * from exactly that checkpoint; the image holds at least one pass of later writes.
 */
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { HOLD_ACKS_TRIGGER } from '../src/migrate/faults.ts';
import { diskcheck, fileSize, waitDiskPasses } from './harness.ts';
import { bootDiskCluster, waitApplied } from './scenarios.ts';

/** Long enough for two diskcheck passes on the destination; the rollback cuts it short. */
const HOLD_MS = 20_000;

t.test('journal forced to write through: diskcheck detects the split disk after a rollback', async (t) => {
  const c = await bootDiskCluster(t, {
    disk: { guest: 'diskcheck' },
    // The destination must not fence itself during the hold.
    vm: { intervalMs: 1000, fenceTimeoutMs: HOLD_MS + 5000, failoverTimeoutMs: HOLD_MS + 10_000 },
    faults: {
      destination: 'journal-write-through',
      source: `hold-acks-ms=${HOLD_MS},hold-acks-epoch=1,hold-acks-trigger`,
    },
  });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  // The guest is writing on the destination (a pass completed there since switchover).
  await waitDiskPasses(c.serialLog(c.dst), 0, 1, 'on the destination');
  const before = (await c.status(c.src)).migration?.appliedEpoch ?? 0;
  fs.writeFileSync(path.join(c.src.stateDir, c.vmName, HOLD_ACKS_TRIGGER), '');
  await waitApplied(c, before + 1, migrating);
  const held = (await c.status(c.src)).migration?.appliedEpoch as number;
  // Every line the destination's serial log gets from here on was printed after checkpoint
  // `held` was taken: the pass after the next completed one wrote only in later epochs.
  const fromDst = fileSize(c.serialLog(c.dst));
  await waitDiskPasses(c.serialLog(c.dst), fromDst, 2, 'on the destination while the ACK is held');
  t.equal((await c.status(c.src)).migration?.appliedEpoch, held, `the source still holds at checkpoint ${held}`);
  const d = await c.status(c.dst);
  process.kill(d.pid, 'SIGKILL');
  const mig = await migrating;
  t.equal(mig.result?.outcome, 'rolled-back', `rolled back: ${mig.stderr.slice(-1000)}`);
  t.equal(mig.result?.rollback?.epoch, held, `resumed from the held checkpoint ${held}`);
  const from = fileSize(c.serialLog(c.src));
  const rep = await waitDiskPasses(c.serialLog(c.src), from, 2, 'on the source after rollback');
  const all = diskcheck(c.serialLog(c.src)).mismatch;
  t.ok(rep.mismatch.length > 0 || all.length > 0, `diskcheck reports the mismatch: ${all.slice(0, 3).join(' | ')}`);
  t.match(all.join('\n'), /diskcheck MISMATCH block=\d+ expected_seq=\d+ found_seq=\d+/, 'a block holds a write the memory never made');
});
