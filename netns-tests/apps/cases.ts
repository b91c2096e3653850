/**
 * The two real-application scenarios `npm test` runs (netns-tests/apps-core.test.ts) and
 * `npm run test:apps` runs with the rest of the matrix (kill.test.ts, control.test.ts):
 * one interruption with the three services in use, and its control (docs/apps.md).
 */
import type { Test } from 'tap';
import type { Cluster } from '../../lab/cluster.ts';
import { bootDebianCluster, debianGuest } from '../../lab/apps/debian.ts';
import { startMemcachedWriter, verifyKeys } from '../../lab/apps/memcached.ts';
import { startDownload, startTickReader } from '../../lab/apps/nginx.ts';
import { startWriter, verifyRows } from '../../lab/apps/pg.ts';
import { APP_HOLD, assertAppsRolledBack, interruptDuringAppHold, killQemu } from './scenario.ts';

/**
 * kill -9 of the destination's QEMU in post-copy with the three services in use.
 * PostgreSQL is disk and network output commit together: psql inserts rows continuously
 * over one connection, and the kill lands while the destination has run (and committed) in
 * epochs the source never acknowledged. After the rollback the same connection goes on,
 * every commit whose acknowledgement reached the client is in the table with its payload,
 * and nothing the client was not told about is. Beside it memccp stores keys (every STORED
 * key reads back on the source), curl reads nginx's tick.log continuously (every read
 * extends the earlier ones), and a curl download of /big.bin paused before the migration
 * is resumed during the held epochs: it completes on the same connection with the right
 * bytes.
 */
export async function killWithAllApps(t: Test): Promise<void> {
  const g = debianGuest();
  const c = await bootDebianCluster(t, APP_HOLD);
  const w = startWriter(t, c);
  const mc = startMemcachedWriter(t, c);
  const tick = startTickReader(t, c);
  await w.waitAcked(10, 'before migrating');
  await mc.waitStored(10, 'before migrating');
  await tick.waitReads(3, 'before migrating');
  const dl = startDownload(t, c);
  await dl.waitBytes(1024 * 1024, 'before migrating');
  dl.pause();
  await assertAppsRolledBack(t, c, w, mc, await interruptDuringAppHold(t, c, w, killQemu, { duringHold: () => dl.resume() }), {
    tick,
  });

  const r = await dl.done();
  t.equal(r.code, 0, `curl succeeded: ${dl.stderr.slice(-500)}`);
  t.equal(r.connects, 1, 'one connection for the whole body');
  t.equal(r.bytes, g.bigBytes, `the whole body (${r.bytes} bytes)`);
  t.equal(r.sha256, g.bigSha256, 'sha256 of the body is the file of the image');
}

/**
 * CONTROL for killWithAllApps and rollback.test.ts: the kill -9 scenario with the
 * destination's gate forced open (TETHER_FAULTS=gate-open). The clients then receive COMMIT
 * and STORED answers and tick.log lines of epochs the source never acknowledged; the
 * rollback takes those back, and the verification MUST report an acknowledged commit and
 * a STORED key that are missing, and a read of tick.log that a later read contradicts. If
 * it does not, those checks prove nothing. (The /big.bin download has no such control: the
 * bytes at an offset of a static file are the same whichever epoch sends them.)
 */
export async function controlGateOpen(
  t: Test,
  interrupt: (c: Cluster, destinationQemu: number) => void | Promise<void> = (_c, pid) => killQemu(pid),
  staged = false,
): Promise<void> {
  const c = await bootDebianCluster(t, { ...APP_HOLD, faults: { ...APP_HOLD.faults, destination: 'gate-open' } });
  const w = startWriter(t, c);
  const mc = startMemcachedWriter(t, c);
  const tick = startTickReader(t, c);
  await w.waitAcked(10, 'before migrating');
  await mc.waitStored(10, 'before migrating');
  await tick.waitReads(3, 'before migrating');
  const { mig, held, ackedInHold } = await interruptDuringAppHold(t, c, w, (pid) => interrupt(c, pid), {
    control: true,
    memcached: mc,
    tick,
  });
  t.equal(mig.result?.outcome, 'rolled-back', `rolled back: ${mig.stderr.slice(-1000)}`);
  const epoch = mig.result?.rollback?.epoch ?? -1;
  // (staged: a cut link or a dead destination sidecar leaves S applying what it had received)
  if (staged) t.ok(epoch >= held, `resumed from checkpoint ${epoch}, the held ${held} or one it had received before`);
  else t.equal(epoch, held, `resumed from the held checkpoint ${held}`);
  t.ok(ackedInHold > 0, `the open gate let out acknowledgements of commits sent during the hold (${ackedInHold})`);
  // The psql connection cannot go on: the client's TCP saw bytes of epochs the source never
  // had. End psql and read the table over a new connection.
  w.kill();
  const check = verifyRows(c, w);
  t.ok(check.lost.length > 0, `the client detects a lost acknowledged commit: ${check.lost.slice(0, 3).join(' | ')}`);
  await mc.stop();
  const lost = await verifyKeys(c, mc);
  t.ok(lost.length > 0, `the memcached client detects a lost STORED key: ${lost.slice(0, 3).join(' | ')}`);
  // Reads on the source after the rollback: the first one answered already contradicts
  // what the client read during the hold (shorter, or other lines at the same place).
  const since = Date.now();
  tick.abortInFlight();
  await tick.waitReads(1, 'on the source after the rollback', since);
  await tick.stop();
  t.ok(
    tick.violations.length > 0,
    `the nginx reader detects a read of undone state (${tick.reads.length} reads, ${tick.failed.length} unanswered): ${tick.violations.slice(0, 2).join(' | ')}`,
  );
}
