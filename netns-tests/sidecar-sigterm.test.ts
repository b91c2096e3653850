import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import type { Cluster } from '../lab/cluster.ts';
import { fileSize, qemuAlive } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { assertNotRunningOn, assertSurvivedOnSource, bootCluster } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

/*
 * One cluster for the three scenarios: each one before the last leaves the VM running
 * and verified on the source, and the next starts from there (a fresh boot per scenario
 * would add nothing but the boot). The last one stops the VM.
 * The cluster boots in t.before: tap's root test would end by itself while a top-level
 * await keeps it idle.
 */
let c: Cluster;
t.before(async () => {
  // the destination does not ask to complete before a scenario interrupts the migration
  c = await bootCluster(t, { holdCompletion: true });
});

t.test('SIGTERM of the source sidecar mid post-copy: no rollback at shutdown, the restart recovers', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const src = await c.status(c.src);
  t.equal(await c.termDaemon(c.src), 0, 'the sidecar exits cleanly on SIGTERM');
  const mig = await migrating;
  t.equal(mig.code, 1, 'the migrate command reports an error');
  t.match(mig.stderr, 'ERR_DAEMON_SHUTDOWN', 'and says why');
  // Nothing was decided during shutdown: the source QEMU (wedged in post-copy) was not
  // replaced, and the marker is left for recovery.
  t.ok(qemuAlive(src.pid), 'the source QEMU was not killed by the shutdown');
  t.ok(fs.existsSync(path.join(c.src.stateDir, c.vmName, 'migration.json')), 'the migration marker is left for recovery');
  // The destination loses its channel and fences itself.
  await assertNotRunningOn(t, c, c.dst);

  await c.restartDaemon(c.src);
  const s = await c.status(c.src);
  t.equal(s.state, 'running', 'VM runs on the source again');
  t.not(s.pid, src.pid, 'a fresh QEMU replaced the wedged one');
  t.equal(s.lastMigration?.reason, 'sidecar-restart');
  t.ok((s.lastMigration?.rollback?.epoch ?? -1) >= 3, `resumed from checkpoint ${s.lastMigration?.rollback?.epoch}`);
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 2, 'after recovery');
  t.same(rep.corrupt, [], 'no CORRUPT after recovery');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT anywhere in the source serial log');
  t.same(memcheck(c.serialLog(c.dst)).corrupt, [], 'no CORRUPT in the destination serial log');
});

t.test('SIGTERM of the destination sidecar mid post-copy: D fences, the VM resumes on the source', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const d = await c.status(c.dst);
  t.equal(await c.termDaemon(c.dst), 0, 'the destination sidecar exits cleanly on SIGTERM');
  t.notOk(qemuAlive(d.pid), "the destination's copy was fenced at shutdown, not left running");
  await assertSurvivedOnSource(t, c, await migrating, (e) => e >= 3);
  await c.restartDaemon(c.dst); // for the next scenario
});

t.test('SIGTERM of the sidecar leaves the VM running; the next start adopts it', async (t) => {
  const before = await c.status(c.src);
  t.equal(await c.termDaemon(c.src), 0, 'the sidecar exits cleanly on SIGTERM');
  t.ok(qemuAlive(before.pid), 'QEMU keeps running after the sidecar stopped');
  const during = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 1, 'while no sidecar runs');
  t.same(during.corrupt, [], 'the guest runs on without its sidecar');
  await c.restartDaemon(c.src);
  const after = await c.status(c.src);
  t.equal(after.state, 'running', 'VM is running after the restart');
  t.equal(after.pid, before.pid, 'the same QEMU process was adopted');
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 1, 'after the restart');
  t.same(rep.corrupt, [], 'no CORRUPT');

  // Stopping a guest is an explicit command.
  const stop = await c.tether(c.src, ['vm', 'stop', c.vmName, '--json']);
  t.equal(stop.code, 0, `vm stop: ${stop.stderr}`);
  t.equal((await c.status(c.src)).state, 'stopped');
  t.notOk(qemuAlive(before.pid), 'vm stop ends the QEMU');
});
