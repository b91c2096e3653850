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
import { bootDebianCluster, debianGuest } from './debian.ts';
import { startMemcachedWriter } from './memcached.ts';
import { startDownload } from './nginx.ts';
import { startWriter } from './pg.ts';
import { APP_HOLD, assertAppsRolledBack, interruptDuringAppHold, killQemu } from './scenario.ts';

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
  await assertAppsRolledBack(t, c, w, mc, await interruptDuringAppHold(t, c, w, killQemu, { duringHold: () => dl.resume() }));

  const r = await dl.done();
  t.equal(r.code, 0, `curl succeeded: ${dl.stderr.slice(-500)}`);
  t.equal(r.connects, 1, 'one connection for the whole body');
  t.equal(r.bytes, g.bigBytes, `the whole body (${r.bytes} bytes)`);
  t.equal(r.sha256, g.bigSha256, 'sha256 of the body is the file of the image');
});
