import t from 'tap';
import { qemuAlive, waitFor } from '../lab/proc.ts';
import { assertConversationContinues, assertNotRunningOn, bootNetCluster } from './scenarios.ts';

/**
 * Steady state is QEMU's own tap backend: no guest frame passes through the sidecar, so a
 * sidecar killed -9 next to a running (not migrating) VM changes nothing the client sees.
 * The conversation is asserted while the sidecar is dead, and again after its restart;
 * the largest gap between two answers over the whole span is reported (the guest's and
 * the machine's own jitter: nothing of tether's is in the path).
 */
t.test(
  'kill -9 of the sidecar while the VM just runs: the conversation goes on, with the sidecar dead and after its restart',
  async (t) => {
    const { c, client } = await bootNetCluster(t);
    const before = await c.status(c.src);
    const from = Date.now();
    await c.killDaemon(c.src);
    t.ok(qemuAlive(before.pid), 'QEMU survives the sidecar being killed');
    await assertConversationContinues(t, client, 'with the sidecar dead');
    await c.restartDaemon(c.src);
    const after = await c.status(c.src);
    t.equal(after.state, 'running', 'VM is running after the restart');
    t.equal(after.pid, before.pid, 'the same QEMU process was adopted');
    await assertConversationContinues(t, client, 'after the sidecar restart');
    const ts = client.answers(from).map((e) => e.t);
    let gap = 0;
    for (let i = 1; i < ts.length; i++) gap = Math.max(gap, ts[i]! - ts[i - 1]!);
    t.comment(`largest gap between answers from the kill on: ${gap} ms (${ts.length} answers)`);
  },
);

/**
 * D's sidecar dies on S's `completed` answer (cut-completion=6), inside the window: its
 * relays die with it, and QEMU's filter-redirectors still send the guest's frames to them
 * (the guest is paused for the answer meanwhile). The restart rebuilds the journal, gets
 * the answer again and runs the VM on D: it must also take the window's NIC wiring down and
 * give the guest its tap, or the guest runs cut off. The client's conversation, which went
 * quiet when the guest paused, goes on over the same connection.
 */
t.test("D's sidecar killed on the completion answer: after its restart the guest on D talks to the client again", async (t) => {
  const { c, client } = await bootNetCluster(t, { faults: { destination: 'cut-completion=6' }, vm: { maxBandwidth: 0 } });
  const migrating = c.migrate();
  const daemon = c.dst.daemon!;
  await waitFor(() => daemon.exitCode !== null || daemon.signalCode !== null, 'destination sidecar gone', 120_000);
  const mig = await migrating;
  t.equal(mig.code, 0, `the source recorded completion: ${mig.stderr.slice(-1500)}`);
  await c.restartDaemon(c.dst);
  await waitFor(async () => (await c.status(c.dst)).state === 'running', 'VM running on the destination', 120_000);
  await assertConversationContinues(t, client, 'after the destination sidecar restart');
  await assertNotRunningOn(t, c, c.src);
});
