/**
 * A real file system on the journaled disk: ext4 in the guest under a write load
 * (files rewritten and fsynced). After a rollback and after a completed migration
 * the guest is stopped where it runs and the host checks the image with
 * `e2fsck -fn` (after replaying the ext4 journal on a copy, as a crash would).
 */
import t from 'tap';
import { e2fsck } from '../lab/e2fsck.ts';
import { fileSize } from '../lab/proc.ts';
import { waitFsRounds } from '../lab/serial.ts';
import { bootDiskCluster, waitDiskWindowClosed } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

const disk = { guest: 'fsload' as const, mib: 64 };

t.test('ext4 is clean after a rollback (kill -9 of the destination QEMU)', async (t) => {
  const c = await bootDiskCluster(t, { disk, holdCompletion: true });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  process.kill((await c.status(c.dst)).pid, 'SIGKILL');
  const mig = await migrating;
  t.equal(mig.result?.outcome, 'rolled-back', `rolled back: ${mig.stderr.slice(-1000)}`);
  await waitFsRounds(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 2, 'on the source after rollback');
  const stop = await c.tether(c.src, ['vm', 'stop', c.vmName]);
  t.equal(stop.code, 0, `vm stop: ${stop.stderr}`);
  const r = e2fsck(c.diskImage);
  t.equal(r.code, 0, `e2fsck -fn clean: ${r.output.slice(-1500)}`);
});

t.test('ext4 is clean after a completed migration', async (t) => {
  const c = await bootDiskCluster(t, { disk });
  const mig = await c.migrate();
  t.equal(mig.result?.outcome, 'completed', `completed: ${mig.stderr.slice(-1000)}`);
  const d = await waitDiskWindowClosed(c);
  t.notOk(
    d.nodes?.some((n) => n.endsWith(':nbd')),
    `the destination QEMU has no NBD node left: ${d.nodes}`,
  );
  await waitFsRounds(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 2, 'on the destination after the switch to its file node');
  const stop = await c.tether(c.dst, ['vm', 'stop', c.vmName]);
  t.equal(stop.code, 0, `vm stop: ${stop.stderr}`);
  const r = e2fsck(c.diskImage);
  t.equal(r.code, 0, `e2fsck -fn clean: ${r.output.slice(-1500)}`);
});
