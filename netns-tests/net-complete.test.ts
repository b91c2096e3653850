import t from 'tap';
import { assertNotRunningOn, assertConversationContinues, assertWireClean, bootNetCluster } from './scenarios.ts';

t.test('a verified TCP conversation with the guest survives a completed migration and goes on on the destination', async (t) => {
  const { c, client, wire } = await bootNetCluster(t, { vm: { maxBandwidth: 0 } }, true);
  const mig = await c.migrate();
  t.equal(mig.code, 0, `migrate exits 0: ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'completed');
  t.equal((await c.status(c.dst)).state, 'running', 'VM runs on the destination');
  await assertNotRunningOn(t, c, c.src);
  await assertConversationContinues(t, client, 'after the migration completed');
  const w = assertWireClean(t, c, wire, 'completed migration');
  if (w) t.ok(w.passed > 0, `the destination's frames after completion were captured (${w.passed})`);
});
