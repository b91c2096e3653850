/**
 * Disk output commit: diskcheck in the guest writes sequence-numbered blocks to
 * its NBD-served disk and verifies all of them against what its memory says.
 * Memory and disk must agree on whichever host runs the VM: after a completed
 * migration, and after rollbacks from each kind of interruption.
 */
import fs from 'node:fs';
import t from 'tap';
import { fileSize } from '../lab/proc.ts';
import { waitDiskPasses } from '../lab/serial.ts';
import { assertDiskSurvivedOnSource, bootDiskCluster, DISK_HOLD, killDuringDiskHold } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

const disk = { guest: 'diskcheck' as const };

t.test('diskcheck stays consistent across a completed migration', async (t) => {
  // with zeroing requests too: DISKZERO applied on the source for acknowledged epochs, the
  // journal's write-back (WRITE_ZEROES on the image) for the rest
  const c = await bootDiskCluster(t, { disk: { ...disk, zeroEvery: 4 } });
  const mig = await c.migrate();
  t.equal(mig.code, 0, `migration completes: ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'completed');
  const s = await c.status(c.dst);
  t.equal(s.state, 'running', 'VM runs on the destination');
  const rep = await waitDiskPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 2, 'on the destination after completion');
  t.same(rep.mismatch, [], 'no MISMATCH on the destination');
});

t.test('kill -9 of the destination QEMU: disk and memory roll back together', async (t) => {
  // The control test's scenario (disk-control.test.ts) with the journal on.
  const c = await bootDiskCluster(t, { disk, vm: DISK_HOLD.vm, faults: { source: DISK_HOLD.source }, holdCompletion: true });
  const { mig, held } = await killDuringDiskHold(t, c);
  t.equal(mig.result?.rollback?.epoch, held, `resumed from the held checkpoint ${held}`);
  t.equal(mig.result?.rollback?.hot, true, 'restored on the hot standby (a second NBD client of the disk until then)');
  await assertDiskSurvivedOnSource(t, c, mig);
});

t.test('migration link cut: disk and memory roll back together', async (t) => {
  const c = await bootDiskCluster(t, { disk, holdCompletion: true });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  c.linkDown();
  await assertDiskSurvivedOnSource(t, c, await migrating);
});

t.test('tether abort: disk and memory roll back together', async (t) => {
  const c = await bootDiskCluster(t, { disk, holdCompletion: true });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const a = await c.tether(c.src, ['abort', c.vmName]);
  t.equal(a.code, 0, `abort accepted: ${a.stderr}`);
  await assertDiskSurvivedOnSource(t, c, await migrating);
});

t.test('guest WRITE_ZEROES and TRIM in the window: zero extents reach the source exactly (kill -9 rollback)', async (t) => {
  // diskcheck replaces every 4th write by BLKZEROOUT / BLKDISCARD of 1..4 blocks, which it
  // then expects to read as zeroes: on the destination they are zero extents of the journal,
  // shipped as DISKZERO records and applied on the source by fallocate. A zeroing the source
  // lost (or applied from an unacknowledged epoch) is a MISMATCH after the rollback.
  const c = await bootDiskCluster(t, {
    disk: { ...disk, zeroEvery: 4 },
    vm: DISK_HOLD.vm,
    faults: { source: DISK_HOLD.source },
    holdCompletion: true,
  });
  t.match(fs.readFileSync(c.serialLog(c.src), 'utf8'), /diskcheck start dev=\/dev\/vda blocks=\d+ zero-every=4/, 'the guest zeroes blocks');
  const { mig, held } = await killDuringDiskHold(t, c);
  t.equal(mig.result?.rollback?.epoch, held, `resumed from the held checkpoint ${held}`);
  const log = fs.readFileSync(c.dst.daemonLog, 'utf8').split('\n');
  t.ok(
    log.some((l) => l.includes('disk image reads bypass the page cache (O_DIRECT)')),
    'the destination journal read the shared image with O_DIRECT',
  );
  const sent = log
    .filter((l) => l.includes('"checkpoint sent"'))
    .map((l) => JSON.parse(l) as { epoch: number; diskZeroBytes?: number; diskBytes: number });
  const zeroed = sent.filter((r) => r.epoch <= held && (r.diskZeroBytes ?? 0) > 0);
  t.ok(zeroed.length > 0, `acknowledged checkpoints carried zero extents (epochs ${zeroed.map((r) => r.epoch).join(',')})`);
  await assertDiskSurvivedOnSource(t, c, mig);
});
