/**
 * The destination's guest must not outlive its sidecar during the migration window
 * (src/vm/guard.ts), and must outlive it once the VM simply runs there.
 */
import t from 'tap';
import { fileSize, qemuAlive, waitFor } from '../lab/proc.ts';
import { waitPasses } from '../lab/serial.ts';
import { assertSurvivedOnSource, bootCluster } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

t.test('destination sidecar killed mid post-copy and never restarted: its QEMU dies, the source resumes', async (t) => {
  const c = await bootCluster(t, { holdCompletion: true });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const d = await c.status(c.dst);
  t.equal(d.state, 'migrating-in');
  await c.killDaemon(c.dst);
  await waitFor(() => !qemuAlive(d.pid), 'the orphaned destination QEMU is gone', 60_000);
  t.notOk(qemuAlive(d.pid), 'destination QEMU killed by its guard');
  await assertSurvivedOnSource(t, c, await migrating, (e) => e >= 3);
});

t.test('after a completed migration the destination VM survives its sidecar being killed', async (t) => {
  const c = await bootCluster(t, { vm: { maxBandwidth: 0 } });
  const mig = await c.migrate();
  t.equal(mig.code, 0, `migrate completes: ${mig.stderr.slice(-1000)}`);
  const d = await c.status(c.dst);
  await c.killDaemon(c.dst);
  const rep = await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 2, 'on the destination without its sidecar');
  t.same(rep.corrupt, []);
  t.ok(qemuAlive(d.pid), 'destination QEMU still running (guard disarmed)');
});
