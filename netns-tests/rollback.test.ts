import t from 'tap';
import { fileSize, waitPasses } from './harness.ts';
import { assertSurvivedOnSource, bootCluster, waitApplied } from './scenarios.ts';

t.test('kill -9 of the destination QEMU mid post-copy: the VM resumes on the source', async (t) => {
  const c = await bootCluster(t);
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const d = await c.status(c.dst);
  t.equal(d.state, 'migrating-in', 'destination VM is mid post-copy');
  process.kill(d.pid, 'SIGKILL');
  await assertSurvivedOnSource(t, c, await migrating, (e) => e >= 3);
  t.match(c.metrics(c.src), /^tether_rollbacks_total\{reason="destination-abort"\} 1$/m, 'the rollback is counted');
});

t.test('kill -9 of the source QEMU mid post-copy: a fresh source QEMU resumes the VM', async (t) => {
  const c = await bootCluster(t);
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const s = await c.status(c.src);
  process.kill(s.pid, 'SIGKILL');
  const mig = await migrating;
  t.equal(mig.result?.reason, 'source-qemu-exited');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);
  t.not((await c.status(c.src)).pid, s.pid, 'a new source QEMU');
});

t.test('migration link cut mid post-copy: the VM resumes on the source', async (t) => {
  const c = await bootCluster(t);
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  c.linkDown();
  const mig = await migrating;
  t.equal(mig.result?.reason, 'lease-expired', 'detected by the lease');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);
});

t.test('nftables drop between the hosts mid post-copy: the VM resumes on the source', async (t) => {
  const c = await bootCluster(t);
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  c.nftDrop();
  await assertSurvivedOnSource(t, c, await migrating, (e) => e >= 3);
});

t.test('tether abort mid post-copy, then migrating again completes', async (t) => {
  const c = await bootCluster(t);
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const a = await c.tether(c.src, ['abort', c.vmName]);
  t.equal(a.code, 0, `abort accepted: ${a.stderr}`);
  const mig = await migrating;
  t.equal(mig.result?.reason, 'operator-abort');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);

  const again = await c.migrate();
  t.equal(again.code, 0, `second migration completes: ${again.stderr.slice(-2000)}`);
  t.equal(again.result?.outcome, 'completed');
  const s = await c.status(c.dst);
  t.equal(s.state, 'running', 'VM runs on the destination after the second migration');
  const rep = await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 2, 'on the destination after the second migration');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination after the second migration');
});
