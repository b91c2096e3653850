/**
 * A checkpoint whose apply fails halfway (as on a RAM tmpfs that runs full): the rollback
 * resumes from a whole state — the finished stage — never from device state k-1 over RAM
 * that holds part of k. When the stage cannot be finished, the source proves so before it
 * fences the destination, and the VM continues there (docs/design.md "Restore before fence").
 */
import t from 'tap';
import type { Cluster } from '../lab/cluster.ts';
import { fileSize, qemuAlive } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { assertNotRunningOn, assertSurvivedOnSource, bootCluster } from './scenarios.ts';

/*
 * One cluster: the first scenario leaves the VM running and verified on the source, and
 * the second starts from there instead of booting another.
 * The cluster boots in t.before: tap's root test would end by itself while a top-level
 * await keeps it idle.
 */
let c: Cluster;
t.before(async () => {
  // the destination does not ask to complete before the injected failure hits a checkpoint
  c = await bootCluster(t, { faults: { source: 'fail-apply-epoch=3' }, holdCompletion: true });
});

t.test('apply of a checkpoint k >= 3 fails halfway once: the stage is finished, the VM resumes from checkpoint k', async (t) => {
  const mig = await c.migrate();
  t.equal(mig.result?.reason, 'apply-failed');
  t.equal(mig.result?.error?.code, 'ERR_CKPT_IO');
  // checkpoint k-1 is the last one acked, but RAM holds part of k: only k, finished, is whole
  // (k: the first checkpoint from 3 on with pages to write; the failure message names it)
  const k = Number(/applying checkpoint (\d+)/.exec(String(mig.result?.error?.message))?.[1]);
  t.ok(k >= 3, `the injected failure hit checkpoint ${k}`);
  await assertSurvivedOnSource(t, c, mig, (e) => e === k);
});

t.test('apply of a checkpoint k >= 3 cannot be finished: the destination is never fenced, the VM continues there', async (t) => {
  // the source's fault changes with a restart of its sidecar, which adopts the running VM
  t.equal(await c.termDaemon(c.src), 0, 'the source sidecar stopped for this scenario');
  await c.restartDaemon(c.src, { faults: 'fail-apply-sticky=3' });
  const before = await c.status(c.src);
  const mig = await c.migrate();
  // Before: the source told the destination to fence, then failed to restore: exit 4, the VM nowhere.
  t.equal(mig.code, 5, `migrate exits 5 (rollback impossible, the VM continues on the destination): ${mig.stderr.slice(-1000)}`);
  t.equal(mig.result?.outcome, 'continued-on-destination');
  t.equal(mig.result?.reason, 'apply-failed');
  t.equal(mig.result?.error?.code, 'ERR_CKPT_HALF_APPLIED', 'the cause: a checkpoint half applied');
  const s = await c.status(c.dst);
  t.equal(s.state, 'running', 'the VM runs on the destination');
  t.ok(qemuAlive(s.pid), 'its QEMU is alive');
  await assertNotRunningOn(t, c, c.src);
  t.notOk(qemuAlive(before.pid), 'the source QEMU is gone (never resumed on mixed state)');
  // Two more memcheck passes on the destination: every page verified after the hand-over,
  // including those it pulled from the source while the source gave the rollback up.
  const from = fileSize(c.serialLog(c.dst));
  const rep = await waitPasses(c.serialLog(c.dst), from, 2, 'on the destination after the source gave up');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination');
  t.same(memcheck(c.serialLog(c.dst)).corrupt, [], 'no CORRUPT anywhere on the destination');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT on the source');
});
