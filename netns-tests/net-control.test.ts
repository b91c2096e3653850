import t from 'tap';
import { assertSurvivedOnSource, bootNetCluster, NET_MODE, waitApplied } from './scenarios.ts';

// CONTROL: the kill -9 scenario of net-rollback.test.ts with the destination's gate forced
// to pass-through (TETHER_FAULTS=gate-open). The client then sees output of an epoch
// the source never acknowledged, and the conversation must be observed to break: a
// chain mismatch, a counter regression, a stall or a lost connection. If this test
// fails, the checks of the other network scenarios cannot fail either.
t.test('CONTROL: with the gate forced open, kill -9 of the destination QEMU breaks the conversation', async (t) => {
  const { c, client } = await bootNetCluster(t, NET_MODE === 'gate' ? { faults: { destination: 'gate-open' } } : {});
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const d = await c.status(c.dst);
  await client.next((e) => e.ev === 'answer');
  process.kill(d.pid, 'SIGKILL');
  // The VM itself survives (memory is checkpointed either way); only its outputs leaked.
  await assertSurvivedOnSource(t, c, await migrating, (e) => e >= 3);
  const v = await client.waitEvent((e) => e.ev === 'violation', 'the client reporting a violation');
  t.pass(`the client reported: ${JSON.stringify(v)}`);
  t.ok(client.violations.length > 0, 'at least one violation');
});
