import t from 'tap';
import { assertSurvivedOnSource, bootCluster } from './scenarios.ts';
import { waitFor } from './harness.ts';

t.test('failure before the first checkpoint resumes from checkpoint 0', async (t) => {
  const c = await bootCluster(t, { faults: { destination: 'delay-first-checkpoint-ms=600000' }, vm: { fenceTimeoutMs: 60000, failoverTimeoutMs: 120000 } });
  const migrating = c.migrate();
  // the VM runs on the destination (post-copy), but no checkpoint was taken yet
  await waitFor(async () => (await c.status(c.src)).migration?.phase === 'postcopy', 'switchover');
  const d = await c.status(c.dst);
  process.kill(d.pid, 'SIGKILL');
  await assertSurvivedOnSource(t, c, await migrating, (e) => e === 0);
});

for (const mode of ['corrupt', 'truncate'] as const) {
  t.test(`a ${mode}d checkpoint is rejected and the previous one restores`, async (t) => {
    const c = await bootCluster(t, { faults: { destination: `${mode}-epoch=4` } });
    const mig = await c.migrate();
    t.not(mig.result?.reason, 'operator-abort');
    // checkpoint 4 never applied: the source resumes from 3, which is intact
    await assertSurvivedOnSource(t, c, mig, (e) => e === 3);
  });
}
