/**
 * PostgreSQL in the Debian guest (docs/apps.md): disk and network output commit together.
 * psql in the client namespace inserts rows continuously over one connection; the VM is
 * migrated and the destination's QEMU killed in post-copy while the destination has run
 * (and committed) in epochs the source never acknowledged. After the rollback the same
 * connection goes on, and every commit whose acknowledgement reached the client is in the
 * table with its payload, and nothing the client was not told about is.
 */
import t from 'tap';
import { assertNotRunningOn } from '../scenarios.ts';
import { bootDebianCluster } from './debian.ts';
import { startWriter, verifyRows } from './pg.ts';
import { APP_HOLD, killDuringAppHold } from './scenario.ts';

t.test('PostgreSQL: kill -9 of the destination QEMU in post-copy keeps every acknowledged commit', async (t) => {
  const c = await bootDebianCluster(t, APP_HOLD);
  const w = startWriter(t, c);
  await w.waitAcked(10, 'before migrating');
  const { mig, held } = await killDuringAppHold(t, c, w);
  t.equal(mig.code, 3, `migrate exits 3 (rolled back): ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'rolled-back', 'outcome rolled-back');
  t.equal(mig.result?.rollback?.epoch, held, `resumed from the held checkpoint ${held}`);
  t.equal((await c.status(c.src)).state, 'running', 'VM is running on the source');
  const since = Date.now();
  await w.waitAcked(10, 'on the source after the rollback', since);
  t.same(w.errors, [], 'psql reported no error');
  await w.stop();
  t.equal(w.proc.exitCode, 0, 'psql ended normally: one connection for the whole test');
  const check = verifyRows(c, w);
  t.same(check.lost, [], `no acknowledged commit lost (${check.acked} acknowledged, ${check.rows} rows)`);
  t.same(check.phantom, [], 'no row the client was not told about');
  await assertNotRunningOn(t, c, c.dst);
});
