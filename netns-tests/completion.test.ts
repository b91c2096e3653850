/**
 * The completion handshake (docs/completion.md) cut at each step: the VM ends up
 * running on exactly one host, memcheck stays clean, and `tether migrate` tells the truth.
 */
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import { fileSize, qemuAlive, sh, waitFor } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import type { Cluster } from '../lab/cluster.ts';
import { assertNotRunningOn, assertSurvivedOnSource, bootCluster } from './scenarios.ts';

async function assertRunsOnDestination(t: Test, c: Cluster): Promise<void> {
  await waitFor(async () => (await c.status(c.dst)).state === 'running', 'VM running on the destination', 60_000);
  const s = await c.status(c.dst);
  t.ok(qemuAlive(s.pid), 'destination QEMU alive');
  const rep = await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 2, 'on the destination after the hand-over');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT on the source');
  await assertNotRunningOn(t, c, c.src);
}

const pausedOnDestination = (c: Cluster) =>
  /no answer to the completion request yet: guest paused/.test(fs.readFileSync(c.dst.daemonLog, 'utf8'));

/*
 * The first scenario leaves the VM running on the source and the destination without
 * one: the second (the destination's fault changed by a restart of its sidecar) migrates
 * that VM instead of booting another.
 * The cluster boots in t.before: tap's root test would end by itself while a top-level
 * await keeps it idle.
 */
let c: Cluster;
/** The first scenario's migration (rolled back): the second must not take its answers. */
let firstId: string | undefined;
t.before(async () => {
  c = await bootCluster(t, { faults: { destination: 'cut-completion=1' }, vm: { maxBandwidth: 0 } });
});

t.test('request lost (destination drops it with the channel): the source rolls back, the paused destination is told', async (t) => {
  const mig = await c.migrate();
  t.equal(mig.result?.reason, 'peer-channel-closed');
  firstId = mig.result?.migrationId;
  t.match(firstId, /^[0-9a-f-]{36}$/, 'the result names the migration');
  await assertSurvivedOnSource(t, c, mig);
  t.ok(pausedOnDestination(c), 'the destination paused instead of fencing while it waited');
  t.match(fs.readFileSync(c.dst.daemonLog, 'utf8'), /source-rolled-back/, 'the answer rolled-back reached the destination');
});

t.test('answer lost (destination drops it with the channel): completed, answered again', async (t) => {
  // the destination holds no VM after the rollback: a restart of its sidecar sets the fault
  await assertNotRunningOn(t, c, c.dst);
  t.equal(await c.termDaemon(c.dst), 0, 'the destination sidecar stopped for this scenario');
  // hold-completion: the migration is still under way when the stale answer arrives; released after it
  await c.restartDaemon(c.dst, { faults: 'cut-completion=5,hold-completion' });
  // The first migration's answer, rolled-back, retried late: it reaches the destination while
  // this second migration of the same VM is under way there, and must not fence it.
  const stale = c.resolveSender(c.src, c.dst, { migrationId: firstId, vm: c.vmName, outcome: 'rolled-back', epoch: 0 });
  const migrating = c.migrate();
  let current: string | undefined;
  await waitFor(async () => (current = (await c.status(c.dst)).migration?.id) !== undefined, 'second migration on the destination', 60_000);
  t.not(current, firstId, 'the second migration has an id of its own');
  t.equal(await stale.send(), 'unknown', 'the destination refused the stale answer');
  t.match(c.metrics(c.dst), /^tether_stale_resolves_total 1$/m, 'refused as naming another migration, and counted');
  c.releaseCompletion();
  const mig = await migrating;
  t.equal(mig.result?.migrationId, current);
  t.equal(mig.code, 0, `migrate exits 0: ${mig.stderr.slice(-1500)}`);
  t.equal(mig.result?.outcome, 'completed');
  t.equal(mig.result?.handover, 'confirmed');
  await assertRunsOnDestination(t, c);
  await c.cleanup(); // its guest would only load the CPU during the next scenarios
});

t.test('channel cut before the source records completion: rolled back', async (t) => {
  const c = await bootCluster(t, { faults: { source: 'cut-completion=2' }, vm: { maxBandwidth: 0 } });
  const mig = await c.migrate();
  await assertSurvivedOnSource(t, c, mig);
  t.ok(pausedOnDestination(c), 'the destination paused instead of fencing while it waited');
});

t.test('channel cut after the source recorded completion: completed, answered on a new channel', async (t) => {
  const c = await bootCluster(t, { faults: { source: 'cut-completion=3' }, vm: { maxBandwidth: 0 } });
  const mig = await c.migrate();
  t.equal(mig.code, 0, `migrate exits 0: ${mig.stderr.slice(-1500)}`);
  t.equal(mig.result?.outcome, 'completed');
  t.equal(mig.result?.handover, 'confirmed', 'the destination confirmed the answer');
  t.ok(pausedOnDestination(c), 'the destination held the guest paused until the answer');
  await assertRunsOnDestination(t, c);
});

t.test('source sidecar dies right after recording completion: its restart hands over, never resumes', async (t) => {
  const c = await bootCluster(t, { faults: { source: 'cut-completion=4' }, vm: { maxBandwidth: 0 } });
  const srcPid = (await c.status(c.src)).pid;
  const mig = await c.migrate();
  t.not(mig.code, 0, 'the migrate command lost its daemon');
  await waitFor(() => pausedOnDestination(c), 'destination paused, waiting for the answer', 60_000);
  t.equal((await c.status(c.dst)).state, 'migrating-in', 'destination waits');
  await c.restartDaemon(c.src);
  const s = await c.status(c.src);
  t.equal(s.state, 'gone', 'the restarted source does not resume the VM');
  t.equal(s.lastMigration?.outcome, 'completed', '`tether status` on the source reports completed');
  t.notOk(qemuAlive(srcPid), 'the source QEMU is gone');
  await assertRunsOnDestination(t, c);
  const marker = path.join(c.src.stateDir, c.vmName, 'migration.json');
  await waitFor(() => !fs.existsSync(marker), 'source drops its marker once the destination confirmed', 60_000);
  t.equal((await c.status(c.src)).lastMigration?.handover, 'confirmed');
});

t.test('destination sidecar dies on the answer: its guard freezes the guest, its restart waits for the answer', async (t) => {
  const c = await bootCluster(t, { faults: { destination: 'cut-completion=6' }, vm: { maxBandwidth: 0 } });
  const migrating = c.migrate();
  const daemon = c.dst.daemon!;
  await waitFor(() => daemon.exitCode !== null || daemon.signalCode !== null, 'destination sidecar gone', 120_000);
  const pid = Number(
    sh('pgrep', ['-f', `qemu-system.*tether-${c.id}/d/`], { allowFail: true })
      .trim()
      .split('\n')[0],
  );
  t.ok(qemuAlive(pid), 'the incoming QEMU was not killed');
  const state = () => fs.readFileSync(`/proc/${pid}/stat`, 'latin1').split(') ')[1]![0];
  await waitFor(() => state() === 'T', 'guest frozen by the guard', 30_000);
  t.equal(state(), 'T', 'frozen (SIGSTOP) by its guard');
  const mig = await migrating;
  t.equal(mig.code, 0, `the source recorded completion: ${mig.stderr.slice(-1500)}`);
  t.equal(mig.result?.outcome, 'completed');
  t.equal(mig.result?.handover, 'pending', 'not confirmed by the dead destination');
  await c.restartDaemon(c.dst);
  await assertRunsOnDestination(t, c);
  t.equal((await c.status(c.dst)).pid, pid, 'the same QEMU runs the VM');
});
