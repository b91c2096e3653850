/**
 * A barrier longer than the source's lease (the scan of a large VM's RAM) must not look
 * like a dead destination: D keeps heartbeating while its dirty-page scan runs, so S does
 * not roll back and the migration completes. The long barrier is built, not hoped for:
 * the fault switch slow-scan-ms makes the native scan job of checkpoint 1 sleep 2.5 × the
 * lease on the libuv worker thread that then runs the scan, with the guest stopped.
 */
import fs from 'node:fs';
import t from 'tap';
import { fileSize, qemuAlive } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { assertNotRunningOn, bootCluster } from './scenarios.ts';

const LEASE_MS = 8000; // the harness VM's failoverTimeoutMs
const SCAN_MS = Math.round(LEASE_MS * 2.5);

t.test('a barrier 2.5 × the lease long: no rollback, the migration completes', async (t) => {
  const c = await bootCluster(t, {
    vm: { failoverTimeoutMs: LEASE_MS, fenceTimeoutMs: LEASE_MS / 2 },
    faults: { destination: `slow-scan-ms=${SCAN_MS},slow-scan-epoch=1` },
  });
  const mig = await c.migrate();
  t.equal(mig.code, 0, `migrate exits 0: ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'completed', `outcome completed (reason: ${mig.result?.reason})`);
  t.notOk(mig.result?.rollback, 'no rollback');
  // the construction held: checkpoint 1's pause contains the injected sleep, longer than the lease
  t.ok(fs.readFileSync(c.dst.daemonLog, 'utf8').includes('fault injection: slow dirty-page scan'), 'the slow scan ran on D');
  t.ok((mig.result?.pauseMs?.max ?? 0) > LEASE_MS, `the longest barrier (${mig.result?.pauseMs?.max} ms) outlasted the lease`);
  const s = await c.status(c.dst);
  t.equal(s.state, 'running', 'VM runs on the destination');
  t.ok(qemuAlive(s.pid));
  await assertNotRunningOn(t, c, c.src);
  const from = fileSize(c.serialLog(c.dst));
  const rep = await waitPasses(c.serialLog(c.dst), from, 2, 'on the destination');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT on the source');
});
