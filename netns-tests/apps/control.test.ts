/**
 * CONTROL for kill.test.ts and rollback.test.ts: the kill -9 scenario with the destination's
 * gate forced open (TETHER_FAULTS=gate-open). The clients then receive COMMIT and STORED
 * answers of epochs the source never acknowledged; the rollback takes those operations
 * back, and the verification MUST report an acknowledged commit and a STORED key that are
 * missing. If it does not, the PostgreSQL and memcached checks prove nothing. (The nginx
 * download has no such control: the bytes at an offset of a static file are the same
 * whichever epoch sends them.)
 */
import t from 'tap';
import { bootDebianCluster } from './debian.ts';
import { startMemcachedWriter, verifyKeys } from './memcached.ts';
import { startWriter, verifyRows } from './pg.ts';
import { APP_HOLD, interruptDuringAppHold, killQemu } from './scenario.ts';

t.test('CONTROL: with the gate forced open, a commit and a STORED key acknowledged in post-copy are lost by the rollback', async (t) => {
  const c = await bootDebianCluster(t, { ...APP_HOLD, faults: { ...APP_HOLD.faults, destination: 'gate-open' } });
  const w = startWriter(t, c);
  const mc = startMemcachedWriter(t, c);
  await w.waitAcked(10, 'before migrating');
  await mc.waitStored(10, 'before migrating');
  const { mig, held, ackedInHold } = await interruptDuringAppHold(t, c, w, killQemu, { control: true, memcached: mc });
  t.equal(mig.result?.outcome, 'rolled-back', `rolled back: ${mig.stderr.slice(-1000)}`);
  t.equal(mig.result?.rollback?.epoch, held, `resumed from the held checkpoint ${held}`);
  t.ok(ackedInHold > 0, `the open gate let out acknowledgements of commits sent during the hold (${ackedInHold})`);
  // The psql connection cannot go on: the client's TCP saw bytes of epochs the source never
  // had. End psql and read the table over a new connection.
  w.kill();
  const check = verifyRows(c, w);
  t.ok(check.lost.length > 0, `the client detects a lost acknowledged commit: ${check.lost.slice(0, 3).join(' | ')}`);
  await mc.stop();
  const lost = await verifyKeys(c, mc);
  t.ok(lost.length > 0, `the memcached client detects a lost STORED key: ${lost.slice(0, 3).join(' | ')}`);
});
