import t from 'tap';
import {
  assertConversationContinues,
  assertAnnouncedFromSource,
  assertHoldKept,
  assertSurvivedOnSource,
  bootNetCluster,
  interruptDuringHold,
  NET_HOLD,
  NET_MODE,
} from './scenarios.ts';

// The source holds back an ACK for a while (from a checkpoint after the destination's
// guest was seen answering); the interruption lands inside that hold, while the
// destination's guest answers requests that the gate must keep from the client. The
// source resumes from the held checkpoint, an earlier state of the conversation than
// the destination had reached, and the same TCP connection must continue from there
// without the client ever noticing. The hold is the one the destination's gate logged:
// nothing of the held epochs may reach the client (assertHoldKept), and the guest has
// answered in them before the interruption (interruptDuringHold).

t.test('kill -9 of the destination QEMU: the same TCP connection continues, verified, on the source', async (t) => {
  const { c, client, wire } = await bootNetCluster(t, NET_HOLD, true);
  const { mig, holdEpoch, interruptedAt } = await interruptDuringHold(c, client, async () => {
    const d = await c.status(c.dst);
    t.equal(d.state, 'migrating-in', 'destination VM is mid post-copy');
    process.kill(d.pid, 'SIGKILL');
  });
  // (QEMU's own tap cannot be opened twice: with it a rollback restores cold.)
  if (NET_MODE === 'gate') t.equal(mig.result?.rollback?.hot, true, "restored on the hot standby, its NIC sockets renamed onto the VM's");
  await assertSurvivedOnSource(t, c, mig, (e) => e >= holdEpoch);
  assertHoldKept(t, c, wire, holdEpoch, 'kill -9 during the hold');
  await assertAnnouncedFromSource(t, wire, interruptedAt, 'kill -9 during the hold');
  await assertConversationContinues(t, client, 'after the rollback to the source');
});

t.test('migration link cut: the guest segment stays up and the connection continues on the source', async (t) => {
  const { c, client, wire } = await bootNetCluster(t, NET_HOLD, true);
  const { mig, holdEpoch, interruptedAt } = await interruptDuringHold(c, client, () => c.linkDown());
  t.equal(mig.result?.reason, 'lease-expired', 'detected by the lease');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= holdEpoch);
  assertHoldKept(t, c, wire, holdEpoch, 'link cut during the hold');
  await assertAnnouncedFromSource(t, wire, interruptedAt, 'link cut during the hold');
  await assertConversationContinues(t, client, 'after the link cut and rollback');
});

t.test('tether abort: the connection continues on the source', async (t) => {
  const { c, client, wire } = await bootNetCluster(t, NET_HOLD, true);
  const { mig, holdEpoch, interruptedAt } = await interruptDuringHold(c, client, async () => {
    const a = await c.tether(c.src, ['abort', c.vmName]);
    t.equal(a.code, 0, `abort accepted: ${a.stderr}`);
  });
  t.equal(mig.result?.reason, 'operator-abort');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= holdEpoch);
  assertHoldKept(t, c, wire, holdEpoch, 'abort during the hold');
  await assertAnnouncedFromSource(t, wire, interruptedAt, 'abort during the hold');
  await assertConversationContinues(t, client, 'after the abort');
});
