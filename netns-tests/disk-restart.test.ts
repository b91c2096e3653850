/**
 * The destination journal's write-ahead log (docs/journal.md "Restart"): D's sidecar
 * dies while it holds journaled guest writes. Its restart never serves the image
 * pass-through before the outcome is known: it fences (before the completion request)
 * or rebuilds the journal from the log (after it). Asserted on what the guest observes:
 * diskcheck on whichever host runs the VM.
 */
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { diskcheck, fileSize, qemuAlive, waitDiskPasses, waitFor } from './harness.ts';
import type { Cluster } from './harness.ts';
import { assertDiskSurvivedOnSource, assertNotRunningOn, bootDiskCluster, waitApplied } from './scenarios.ts';

const disk = { guest: 'diskcheck' as const };

/** Journal logs the destination still has for the VM. */
const logsOf = (c: Cluster): string[] => {
  const dir = path.join(c.dst.stateDir, 'journal');
  return fs.existsSync(dir) ? fs.readdirSync(dir).filter((n) => n.startsWith(`${c.vmName}.`)) : [];
};

t.test('D sidecar killed -9 mid-window: its restart drops the log unread; S resumes, disk consistent', async (t) => {
  const c = await bootDiskCluster(t, { disk, holdCompletion: true });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  // the guest writes on the destination: those writes are journaled (and logged) there
  await waitDiskPasses(c.serialLog(c.dst), 0, 1, 'on the destination');
  t.equal(logsOf(c).length, 1, 'the destination keeps one log for the migration');
  await c.killDaemon(c.dst);
  const mig = await migrating;
  await c.restartDaemon(c.dst);
  await assertDiskSurvivedOnSource(t, c, mig);
  t.same(logsOf(c), [], 'the restarted destination dropped the log');
  t.match(fs.readFileSync(c.dst.daemonLog, 'utf8'), /journal log of an interrupted incoming migration dropped/);
});

t.test(
  'D sidecar dies on the completion answer: its restart rebuilds the journal from the log, the VM runs on D, disk consistent',
  async (t) => {
    const c = await bootDiskCluster(t, { disk, faults: { destination: 'cut-completion=6' }, vm: { maxBandwidth: 0 } });
    const migrating = c.migrate();
    const daemon = c.dst.daemon!;
    await waitFor(() => daemon.exitCode !== null || daemon.signalCode !== null, 'destination sidecar gone', 120_000);
    t.equal(logsOf(c).length, 1, 'the log outlived the sidecar');
    const mig = await migrating;
    t.equal(mig.code, 0, `the source recorded completion: ${mig.stderr.slice(-1500)}`);
    t.equal(mig.result?.outcome, 'completed');
    await c.restartDaemon(c.dst);
    await waitFor(async () => (await c.status(c.dst)).state === 'running', 'VM running on the destination', 120_000);
    const s = await c.status(c.dst);
    t.ok(qemuAlive(s.pid), 'destination QEMU alive');
    const from = fileSize(c.serialLog(c.dst));
    const rep = await waitDiskPasses(c.serialLog(c.dst), from, 2, 'on the destination after the restart');
    t.same(rep.mismatch, [], 'no MISMATCH after the restart: no acknowledged write lost');
    t.same(diskcheck(c.serialLog(c.dst)).mismatch, [], 'no MISMATCH anywhere in the destination serial log');
    const log = fs.readFileSync(c.dst.daemonLog, 'utf8');
    t.match(log, /journal rebuilt from its log/, 'the restart served the journal, not the image');
    t.same(logsOf(c), [], 'written back: the log is gone');
    await assertNotRunningOn(t, c, c.src);
  },
);
