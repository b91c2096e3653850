/**
 * Interruptions mid post-copy, one after the other on one cluster: each rollback leaves
 * the VM running (and verified by two memcheck passes) on the source, and the next
 * scenario migrates that restored VM again. Booting a fresh cluster per scenario would
 * add nothing but a boot.
 */
import fs from 'node:fs';
import t from 'tap';
import type { Cluster } from '../lab/cluster.ts';
import { fileSize, waitFor } from '../lab/proc.ts';
import { waitPasses } from '../lab/serial.ts';
import { assertSurvivedOnSource, bootCluster } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

// booted before the first scenario (tap's root test would end on its own while a
// top-level await keeps it idle)
let c: Cluster;
t.before(async () => {
  // the destination does not ask to complete before each scenario interrupts the migration
  c = await bootCluster(t, { holdCompletion: true });
});

/** How many answers to a completion request the source has got through to the destination (its log). */
function answersDelivered(c: Cluster): number {
  const log = fs.readFileSync(c.src.daemonLog, 'utf8');
  return (log.match(/destination confirmed the answer|the destination does not know this migration|gave up telling the destination/g) ?? [])
    .length;
}

/**
 * After a rollback the source keeps telling the destination 'rolled back' until it gets
 * through; the answer names no migration, so one still on its way when the next scenario
 * starts would end that scenario's migration. Wait until it was delivered.
 */
async function waitAnswerDelivered(c: Cluster, before: number): Promise<void> {
  await waitFor(() => answersDelivered(c) > before, 'the rollback answer delivered to the destination', 120_000);
}

t.test('kill -9 of the destination QEMU mid post-copy: the VM resumes on the source', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const d = await c.status(c.dst);
  t.equal(d.state, 'migrating-in', 'destination VM is mid post-copy');
  process.kill(d.pid, 'SIGKILL');
  await assertSurvivedOnSource(t, c, await migrating, (e) => e >= 3);
  t.match(c.metrics(c.src), /^tether_rollbacks_total\{reason="destination-abort"\} 1$/m, 'the rollback is counted');
});

t.test('kill -9 of the source QEMU mid post-copy: a fresh source QEMU resumes the VM', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const s = await c.status(c.src);
  process.kill(s.pid, 'SIGKILL');
  const mig = await migrating;
  t.equal(mig.result?.reason, 'source-qemu-exited');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);
  t.not((await c.status(c.src)).pid, s.pid, 'a new source QEMU');
});

t.test('migration link cut mid post-copy: the VM resumes on the source', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const told = answersDelivered(c);
  c.linkDown();
  const mig = await migrating;
  t.equal(mig.result?.reason, 'lease-expired', 'detected by the lease');
  c.linkUp();
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);
  await waitAnswerDelivered(c, told);
});

t.test('nftables drop between the hosts mid post-copy: the VM resumes on the source', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const told = answersDelivered(c);
  c.nftDrop();
  const mig = await migrating;
  c.nftClear();
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);
  await waitAnswerDelivered(c, told);
});

t.test('tether abort mid post-copy, then migrating again completes', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const a = await c.tether(c.src, ['abort', c.vmName]);
  t.equal(a.code, 0, `abort accepted: ${a.stderr}`);
  const mig = await migrating;
  t.equal(mig.result?.reason, 'operator-abort');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);

  c.releaseCompletion();
  const again = await c.migrate();
  t.equal(again.code, 0, `second migration completes: ${again.stderr.slice(-2000)}`);
  t.equal(again.result?.outcome, 'completed');
  const s = await c.status(c.dst);
  t.equal(s.state, 'running', 'VM runs on the destination after the second migration');
  const rep = await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 2, 'on the destination after the second migration');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination after the second migration');
});
