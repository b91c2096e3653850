/**
 * kill -9 of the destination's QEMU in post-copy with the three services of the Debian
 * guest in use (docs/apps.md). PostgreSQL is disk and network output commit together: psql
 * in the client namespace inserts rows continuously over one connection, and the kill
 * lands while the destination has run (and committed) in epochs the source never
 * acknowledged. After the rollback the same connection goes on, every commit whose
 * acknowledgement reached the client is in the table with its payload, and nothing the
 * client was not told about is. Beside it memccp stores keys (every STORED key reads back
 * on the source), and a curl download of /big.bin paused before the migration is resumed
 * during the held epochs: it completes on the same connection with the right bytes.
 */
import t from 'tap';
import { assertNotRunningOn } from '../scenarios.ts';
import { bootDebianCluster, debianGuest } from './debian.ts';
import { startMemcachedWriter, verifyKeys } from './memcached.ts';
import { startDownload } from './nginx.ts';
import { startWriter, verifyRows } from './pg.ts';
import { APP_HOLD, interruptDuringAppHold, killQemu } from './scenario.ts';

t.test('kill -9 of the destination QEMU in post-copy: every acknowledged commit, STORED key and downloaded byte survives', async (t) => {
  const g = debianGuest();
  const c = await bootDebianCluster(t, APP_HOLD);
  const w = startWriter(t, c);
  const mc = startMemcachedWriter(t, c);
  await w.waitAcked(10, 'before migrating');
  await mc.waitStored(10, 'before migrating');
  const dl = startDownload(t, c);
  await dl.waitBytes(1024 * 1024, 'before migrating');
  dl.pause();
  const { mig, held } = await interruptDuringAppHold(t, c, w, killQemu, { duringHold: () => dl.resume() });
  t.equal(mig.code, 3, `migrate exits 3 (rolled back): ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'rolled-back', 'outcome rolled-back');
  t.equal(mig.result?.rollback?.epoch, held, `resumed from the held checkpoint ${held}`);
  t.equal((await c.status(c.src)).state, 'running', 'VM is running on the source');
  const since = Date.now();
  await w.waitAcked(10, 'on the source after the rollback', since);
  await mc.waitStored(5, 'on the source after the rollback', since);

  t.same(w.errors, [], 'psql reported no error');
  await w.stop();
  t.equal(w.proc.exitCode, 0, 'psql ended normally: one connection for the whole test');
  const check = verifyRows(c, w);
  t.same(check.lost, [], `no acknowledged commit lost (${check.acked} acknowledged, ${check.rows} rows)`);
  t.same(check.phantom, [], 'no row the client was not told about');

  await mc.stop();
  const lost = await verifyKeys(c, mc);
  t.same(
    lost,
    [],
    `every STORED key reads back with its value on the source (${mc.stored.size} keys, ${mc.failed.length} sets unacknowledged)`,
  );

  const r = await dl.done();
  t.equal(r.code, 0, `curl succeeded: ${dl.stderr.slice(-500)}`);
  t.equal(r.connects, 1, 'one connection for the whole body');
  t.equal(r.bytes, g.bigBytes, `the whole body (${r.bytes} bytes)`);
  t.equal(r.sha256, g.bigSha256, 'sha256 of the body is the file of the image');
  await assertNotRunningOn(t, c, c.dst);
});
