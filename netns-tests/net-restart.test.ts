import t from 'tap';
import { qemuAlive } from './harness.ts';
import { assertConversationContinues, bootNetCluster } from './scenarios.ts';

t.test('a sidecar restart while the VM just runs: the NIC comes back and the conversation resumes', async (t) => {
  const { c, client } = await bootNetCluster(t);
  const before = await c.status(c.src);
  await c.killDaemon(c.src);
  t.ok(qemuAlive(before.pid), 'QEMU survives the sidecar being killed');
  await c.restartDaemon(c.src);
  const after = await c.status(c.src);
  t.equal(after.state, 'running', 'VM is running after the restart');
  t.equal(after.pid, before.pid, 'the same QEMU process was adopted');
  await assertConversationContinues(t, client, 'after the sidecar restart');
});
