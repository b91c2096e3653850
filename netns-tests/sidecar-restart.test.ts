import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import type { Cluster } from '../lab/cluster.ts';
import { encodeStateFile } from '../src/vm/state-file.ts';
import { MARKER_VERSION } from '../src/vm/instance.ts';
import { fileSize, qemuAlive } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { assertNotRunningOn, bootCluster } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

/*
 * One cluster for the three scenarios: the first two leave the VM running and verified
 * on the source, and the next starts from there (a fresh boot per scenario would add
 * nothing but the boot). The last one migrates it away.
 * The cluster boots in t.before: tap's root test would end by itself while a top-level
 * await keeps it idle.
 */
let c: Cluster;
t.before(async () => {
  // the destination does not ask to complete before a scenario interrupts the migration
  c = await bootCluster(t, { holdCompletion: true });
});

t.test('the source sidecar killed mid post-copy: on restart the VM resumes from the last applied checkpoint', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const src = await c.status(c.src);
  await c.killDaemon(c.src);
  const mig = await migrating;
  t.not(mig.code, 0, 'the migrate command lost its daemon');
  // the destination loses its channel and fences itself
  await assertNotRunningOn(t, c, c.dst);
  await c.restartDaemon(c.src);
  const s = await c.status(c.src);
  t.equal(s.state, 'running', 'VM runs on the source again');
  t.not(s.pid, src.pid, 'a fresh QEMU replaced the wedged one');
  t.notOk(qemuAlive(src.pid), 'the wedged source QEMU is gone');
  t.equal(s.lastMigration?.reason, 'sidecar-restart');
  t.ok((s.lastMigration?.rollback?.epoch ?? -1) >= 3, `resumed from checkpoint ${s.lastMigration?.rollback?.epoch}`);
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 2, 'after recovery');
  t.same(rep.corrupt, [], 'no CORRUPT after recovery');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT anywhere in the source serial log');
});

t.test('a sidecar that dies just after a rollback finished adopts the restored VM instead of restoring again', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const wedged = (await c.status(c.src)).pid;
  t.equal((await c.tether(c.src, ['abort', c.vmName])).code, 0);
  const mig = await migrating;
  t.equal(mig.result?.outcome, 'rolled-back');
  const restored = await c.status(c.src);
  // The state a crash leaves when it lands between "restored VM running" and
  // "migration marker removed": the marker still names the QEMU that was migrating.
  const marker = path.join(c.src.stateDir, c.vmName, 'migration.json');
  fs.writeFileSync(
    marker,
    encodeStateFile(
      'TETHER-MIGRATION',
      { role: 'source', migrationId: mig.result?.migrationId, qemuPid: wedged, peer: c.dst.addr, startedAt: new Date().toISOString() },
      MARKER_VERSION,
    ),
  );
  await c.killDaemon(c.src);
  const passes = memcheck(c.serialLog(c.src)).passes;
  await c.restartDaemon(c.src);
  const s = await c.status(c.src);
  t.equal(s.state, 'running');
  t.equal(s.pid, restored.pid, 'the running, restored QEMU was adopted, not replaced');
  t.notOk(fs.existsSync(marker), 'marker resolved');
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 2, 'after the restart');
  t.same(rep.corrupt, [], 'no CORRUPT');
  t.ok(rep.passes[0]! > passes[passes.length - 1]!, `memcheck went on from pass ${passes[passes.length - 1]} (no second rollback in time)`);
});

t.test('a restarted sidecar adopts its running VM without disturbing it', async (t) => {
  const before = await c.status(c.src);
  await c.killDaemon(c.src);
  t.ok(qemuAlive(before.pid), 'QEMU survives the sidecar being killed');
  await c.restartDaemon(c.src);
  const after = await c.status(c.src);
  t.equal(after.state, 'running', 'VM is running after the restart');
  t.equal(after.pid, before.pid, 'the same QEMU process was adopted');
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 1, 'after the sidecar restart');
  t.same(rep.corrupt, [], 'no CORRUPT');
  // and it can still be migrated
  c.releaseCompletion();
  const mig = await c.migrate();
  t.equal(mig.code, 0, `adopted VM migrates: ${mig.stderr.slice(-1500)}`);
});
