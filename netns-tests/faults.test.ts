import t from 'tap';
import { assertSurvivedOnSource, bootCluster } from './scenarios.ts';
import { fileSize, waitFor, waitPasses } from './harness.ts';

t.test('failure before the first checkpoint resumes from checkpoint 0', async (t) => {
  const c = await bootCluster(t, {
    faults: { destination: 'delay-first-checkpoint-ms=600000' },
    vm: { fenceTimeoutMs: 60000, failoverTimeoutMs: 120000 },
  });
  const migrating = c.migrate();
  // the VM runs on the destination (post-copy), but no checkpoint was taken yet
  await waitFor(async () => (await c.status(c.src)).migration?.phase === 'postcopy', 'switchover');
  const d = await c.status(c.dst);
  process.kill(d.pid, 'SIGKILL');
  await assertSurvivedOnSource(t, c, await migrating, (e) => e === 0);
});

for (const mode of ['corrupt', 'truncate'] as const) {
  t.test(`a ${mode === 'corrupt' ? 'corrupted' : 'truncated'} checkpoint is rejected and the previous one restores`, async (t) => {
    const c = await bootCluster(t, { faults: { destination: `${mode}-epoch=4` } });
    const mig = await c.migrate();
    if (mode === 'corrupt') {
      // the source's decoder refused the frame (CRC, or MAC if the CRC happened to match)
      t.match(mig.result?.error?.code, /^ERR_PROTO_BAD_(CRC|MAC)$/, `rejected with ${mig.result?.error?.code}`);
    } else {
      t.equal(mig.result?.reason, 'peer-channel-closed', 'the half-sent checkpoint was discarded when the channel dropped');
    }
    // checkpoint 4 never applied: the source resumes from 3, which is intact
    await assertSurvivedOnSource(t, c, mig, (e) => e === 3);
  });
}

t.test('a destination without the peer key gets nothing: the migration is refused and the VM keeps running', async (t) => {
  const c = await bootCluster(t, { mismatchedKeys: true });
  const ramBefore = await c.status(c.src);
  const mig = await c.migrate();
  t.equal(mig.code, 3, 'migrate exits 3: the VM still runs on the source');
  t.match(mig.result?.error?.code, /^ERR_PEER_(AUTH|HANDSHAKE)$/, `refused with ${mig.result?.error?.code}`);
  t.equal(mig.result?.rollback?.epoch, null, 'nothing was switched over');
  const s = await c.status(c.src);
  t.equal(s.state, 'running');
  t.equal(s.pid, ramBefore.pid, 'the same source QEMU kept running');
  const d = await c.status(c.dst);
  t.equal(d.state, 'absent', 'the destination never created the VM');
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 1, 'after the refused migration');
  t.same(rep.corrupt, []);
});
