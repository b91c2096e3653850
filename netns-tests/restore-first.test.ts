/**
 * Restore before fence (docs/design.md): a source that decides to roll back while the
 * destination is reachable tells it to hold, and fences it only once a standby QEMU has
 * loaded the last checkpoint. Here no standby can load it (the fault switch
 * fail-restore-load hands the standbys a device-state file that is no migration stream, so
 * the load fails in QEMU itself): the operator's abort must leave the VM running on the destination,
 * every page verified, instead of fencing it and then failing to restore (before: the ABORT
 * went out first, and the VM ended on neither host).
 *
 * The migration is held open by construction: the source holds ACK(1) (hold-acks) far
 * beyond the time the test needs, with both sides' timeouts beyond the hold, so it cannot
 * complete or fence before the abort; the decision ends the hold.
 */
import t from 'tap';
import { fileSize, qemuAlive } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { assertNotRunningOn, bootCluster } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

const HOLD_MS = 120_000;

t.test('tether abort when no standby can load the checkpoint: the VM continues on the destination', async (t) => {
  const c = await bootCluster(t, {
    vm: { fenceTimeoutMs: HOLD_MS + 30_000, failoverTimeoutMs: HOLD_MS + 60_000 },
    faults: { source: `hold-acks-ms=${HOLD_MS},hold-acks-epoch=1,fail-restore-load` },
  });
  const before = await c.status(c.src);
  const migrating = c.migrate();
  await waitApplied(c, 1, migrating);
  const a = await c.tether(c.src, ['abort', c.vmName]);
  t.equal(a.code, 0, `abort accepted: ${a.stderr}`);
  const mig = await migrating;
  t.equal(mig.code, 5, `migrate exits 5: ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'continued-on-destination');
  t.equal(mig.result?.reason, 'operator-abort');
  t.equal(mig.result?.error?.code, 'ERR_RESTORE_UNAVAILABLE', 'the cause: no standby could load the checkpoint');
  const s = await c.status(c.dst);
  t.equal(s.state, 'running', 'the VM runs on the destination');
  t.ok(qemuAlive(s.pid), 'its QEMU is alive');
  await assertNotRunningOn(t, c, c.src);
  t.notOk(qemuAlive(before.pid), 'the source QEMU is gone');
  const from = fileSize(c.serialLog(c.dst));
  const rep = await waitPasses(c.serialLog(c.dst), from, 2, 'on the destination after the source gave up');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination');
  t.same(memcheck(c.serialLog(c.dst)).corrupt, [], 'no CORRUPT anywhere on the destination');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT on the source');
});
