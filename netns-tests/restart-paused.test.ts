import t from 'tap';
import type { Cluster } from '../lab/cluster.ts';
import { fileSize, qemuAlive, waitFor } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { bootCluster } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

/*
 * A rollback past switchover restores the VM into a new QEMU that loads the checkpoint's device
 * state and waits paused (-S) until the sidecar connects its NICs and says `cont`. The source's
 * sidecar dies exactly there (fault switch crash-before-resume): the restarted sidecar must
 * resume that QEMU (cont + MAC announcement, the live rollback's code), never adopt it as
 * `running` while its guest stands still. Cold restore (no hot standby): its QEMU always starts
 * paused, whatever the VM's NICs.
 */
let c: Cluster;
t.before(async () => {
  c = await bootCluster(t, { vm: { hotStandby: false }, faults: { source: 'crash-before-resume' } });
});

t.test('a sidecar that dies before resuming a restored VM: its restart resumes it', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const wedged = (await c.status(c.src)).pid;
  // abort: S rolls back, restores into a fresh paused QEMU, then its sidecar dies
  await c.tether(c.src, ['abort', c.vmName]);
  const mig = await migrating;
  t.not(mig.code, 0, 'the migrate command lost its daemon');
  await waitFor(() => c.src.daemon?.exitCode !== null || c.src.daemon?.signalCode !== null, 'the source sidecar to die');
  t.notOk(qemuAlive(wedged), 'the wedged QEMU was killed by the rollback');
  const passes = memcheck(c.serialLog(c.src)).passes;
  await c.restartDaemon(c.src, { faults: undefined });
  const s = await c.status(c.src);
  t.equal(s.state, 'running');
  t.not(s.pid, wedged, 'the restored QEMU, adopted');
  t.ok(qemuAlive(s.pid), 'it runs');
  // the guest itself runs again: memcheck makes new passes, with no corruption
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 2, 'after the restart');
  t.same(rep.corrupt, [], 'no CORRUPT');
  t.ok(rep.passes[0]! > (passes[passes.length - 1] ?? -1), 'memcheck went on');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT anywhere in the source serial log');
});
