import t from 'tap';
import { qemuAlive } from '../lab/proc.ts';
import { assertConversationContinues, bootNetCluster } from './scenarios.ts';

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
