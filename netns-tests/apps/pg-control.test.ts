/**
 * CONTROL for pg.test.ts: the same kill -9 with the destination's gate forced open
 * (TETHER_FAULTS=gate-open). The client then receives COMMIT acknowledgements of epochs
 * the source never acknowledged; the rollback takes those transactions back, and the
 * verification MUST report an acknowledged commit that is missing. If it does not, the
 * PostgreSQL scenario proves nothing.
 */
import t from 'tap';
import { bootDebianCluster } from './debian.ts';
import { startWriter, verifyRows } from './pg.ts';
import { APP_HOLD, interruptDuringAppHold, killQemu } from './scenario.ts';

t.test('CONTROL: with the gate forced open, a commit acknowledged in post-copy is lost by the rollback', async (t) => {
  const c = await bootDebianCluster(t, { ...APP_HOLD, faults: { ...APP_HOLD.faults, destination: 'gate-open' } });
  const w = startWriter(t, c);
  await w.waitAcked(10, 'before migrating');
  const { mig, held, ackedInHold } = await interruptDuringAppHold(t, c, w, killQemu, { control: true });
  t.equal(mig.result?.outcome, 'rolled-back', `rolled back: ${mig.stderr.slice(-1000)}`);
  t.equal(mig.result?.rollback?.epoch, held, `resumed from the held checkpoint ${held}`);
  t.ok(ackedInHold > 0, `the open gate let out acknowledgements of commits sent during the hold (${ackedInHold})`);
  // The connection cannot go on: the client's TCP saw bytes of epochs the source never
  // had. End psql and read the table over a new connection.
  w.kill();
  const check = verifyRows(c, w);
  t.ok(check.lost.length > 0, `the client detects a lost acknowledged commit: ${check.lost.slice(0, 3).join(' | ')}`);
});
