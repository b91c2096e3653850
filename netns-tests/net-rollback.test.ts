import t from 'tap';
import { assertConversationContinues, assertSurvivedOnSource, bootNetCluster, waitApplied } from './scenarios.ts';

// In each scenario the interruption lands right after the client received an answer
// that the destination's guest produced: that answer's epoch is not acknowledged yet,
// so the gate still holds whatever the guest sent after it, and the source resumes
// from an earlier state of the conversation.

t.test('kill -9 of the destination QEMU: the same TCP connection continues, verified, on the source', async (t) => {
  const { c, client } = await bootNetCluster(t);
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const d = await c.status(c.dst);
  t.equal(d.state, 'migrating-in', 'destination VM is mid post-copy');
  await client.next((e) => e.ev === 'answer');
  process.kill(d.pid, 'SIGKILL');
  await assertSurvivedOnSource(t, c, await migrating, (e) => e >= 3);
  await assertConversationContinues(t, client, 'after the rollback to the source');
});

t.test('migration link cut: the guest segment stays up and the connection continues on the source', async (t) => {
  const { c, client } = await bootNetCluster(t);
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  await client.next((e) => e.ev === 'answer');
  c.linkDown();
  const mig = await migrating;
  t.equal(mig.result?.reason, 'lease-expired', 'detected by the lease');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);
  await assertConversationContinues(t, client, 'after the link cut and rollback');
});

t.test('tether abort: the connection continues on the source', async (t) => {
  const { c, client } = await bootNetCluster(t);
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  await client.next((e) => e.ev === 'answer');
  const a = await c.tether(c.src, ['abort', c.vmName]);
  t.equal(a.code, 0, `abort accepted: ${a.stderr}`);
  const mig = await migrating;
  t.equal(mig.result?.reason, 'operator-abort');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);
  await assertConversationContinues(t, client, 'after the abort');
});
