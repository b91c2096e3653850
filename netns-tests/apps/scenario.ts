/**
 * The interruption of the real-application scenarios: migrate the Debian VM and interrupt
 * the migration in post-copy (kill -9 of the destination's QEMU, a cut link, `tether
 * abort`) while the source withholds the ACK of a checkpoint
 * (a hold-acks-trigger fault, as the network scenarios), so that the destination's
 * PostgreSQL has committed transactions in epochs the source never acknowledges.
 */
import type { Test } from 'tap';
import type { Cluster } from '../../lab/cluster.ts';
import type { ClusterOptions } from '../../lab/topology.ts';
import { waitFor } from '../../lab/proc.ts';
import { heldFrames, holdFault, migrateIntoHold } from '../scenarios.ts';
import { assertNotRunningOn } from '../scenarios.ts';
import { verifyKeys } from '../../lab/apps/memcached.ts';
import type { MemcachedWriter } from '../../lab/apps/memcached.ts';
import type { TickReader } from '../../lab/apps/nginx.ts';
import { verifyRows } from '../../lab/apps/pg.ts';
import type { PgWriter } from '../../lab/apps/pg.ts';

/**
 * Long enough for the destination's guest to commit (and, with the gate forced open, to
 * acknowledge) transactions in the held epochs on a slow machine; the kill cuts it short.
 * The destination must not fence itself during it, nor the source's lease expire.
 */
const APP_HOLD_MS = 30_000;
export const APP_HOLD: ClusterOptions = {
  vm: { fenceTimeoutMs: APP_HOLD_MS + 5000, failoverTimeoutMs: APP_HOLD_MS + 10_000 },
  faults: { source: holdFault(APP_HOLD_MS) },
  holdCompletion: true,
};

/** Acknowledged commits from the destination's guest before the hold is armed. */
const LIVE_COMMITS = 3;
/** Frames of the held epochs the destination's gate holds before the kill. */
const HELD_FRAMES = 2;

/**
 * Migrate; once the destination's guest acknowledges commits, arm the source's ACK hold
 * and wait until the destination processed the ACK before it (and call `duringHold`). Then, with the gate on,
 * wait until the gate holds HELD_FRAMES frames of the held epochs (the guest's answers to
 * the transaction in flight: the client sees no acknowledgement); with the gate forced open (`control`), wait
 * until a transaction sent after that point was acknowledged to the client (and a memcached
 * set STORED, with `memcached`, and nginx answered a read of tick.log with lines appended after it
served an earlier read sent after that point, with `tick`). Then
 * `interrupt` (given the destination's QEMU pid). Returns the migration's result and the held checkpoint.
 */
export async function interruptDuringAppHold(
  t: Test,
  c: Cluster,
  w: PgWriter,
  interrupt: (destinationQemu: number) => void | Promise<void>,
  opts: { control?: boolean; duringHold?: () => void; memcached?: MemcachedWriter; tick?: TickReader } = {},
): Promise<{ mig: Awaited<ReturnType<Cluster['migrate']>>; held: number; ackedInHold: number }> {
  const {
    migrating,
    holdEpoch: held,
    notEnded,
  } = await migrateIntoHold(
    c,
    (onDest) => w.ackedSentSince(onDest) >= LIVE_COMMITS,
    `${LIVE_COMMITS} commits acknowledged by the destination's guest`,
  );
  const from = Date.now();
  const ackedBefore = w.acked.length;
  opts.duringHold?.();
  if (opts.control) {
    await waitFor(
      () => {
        notEnded('during the hold');
        return (
          w.ackedSentSince(from) >= 1 && (opts.memcached?.storedSentSince(from) ?? 1) >= 1 && (opts.tick?.grewAfterReadSince(from) ?? true)
        );
      },
      `a commit${opts.memcached ? ' and a memcached set' : ''}${opts.tick ? ' and tick.log lines' : ''} of the hold acknowledged through the open gate`,
    );
  } else {
    await waitFor(() => {
      notEnded('during the hold');
      return heldFrames(c) >= HELD_FRAMES;
    }, `${HELD_FRAMES} frames of the held epochs in the destination's gate`);
  }
  const ackedInHold = w.ackedSentSince(from);
  t.equal((await c.status(c.src)).migration?.appliedEpoch, held, `the source still holds at checkpoint ${held}`);
  const d = await c.status(c.dst);
  t.equal(d.state, 'migrating-in', 'destination VM is mid post-copy');
  await interrupt(d.pid);
  t.comment(`interrupted: ${w.acked.length - ackedBefore} acknowledgements during the hold`);
  return { mig: await migrating, held, ackedInHold };
}

/** kill -9 of the destination's QEMU. */
export const killQemu = (pid: number): void => {
  process.kill(pid, 'SIGKILL');
};

/**
 * What every rollback scenario asserts: S resumed from the held checkpoint (`staged`: or a
 * later one it had received before the interruption — a cut link or a dead destination
 * sidecar leaves S applying what it had staged), the VM runs on S only, psql and memccp go
 * on there over their connections, every acknowledged commit and STORED key is present and
 * no row the client was not told about; with `tick`, every read of nginx's tick.log, before,
 * during and after the interruption, extends the reads before it.
 */
export async function assertAppsRolledBack(
  t: Test,
  c: Cluster,
  w: PgWriter,
  mc: MemcachedWriter,
  r: { mig: Awaited<ReturnType<Cluster['migrate']>>; held: number },
  opts: { staged?: boolean; tick?: TickReader } = {},
): Promise<void> {
  const { staged = false, tick } = opts;
  const { mig, held } = r;
  t.equal(mig.code, 3, `migrate exits 3 (rolled back): ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'rolled-back', 'outcome rolled-back');
  const epoch = mig.result?.rollback?.epoch;
  if (staged) t.ok(epoch >= held, `resumed from checkpoint ${epoch}, the held ${held} or one it had received before the interruption`);
  else t.equal(epoch, held, `resumed from the held checkpoint ${held}`);
  t.equal((await c.status(c.src)).state, 'running', 'VM is running on the source');
  const since = Date.now();
  await w.waitAcked(10, 'on the source after the rollback', since);
  await mc.waitStored(5, 'on the source after the rollback', since);
  if (tick) {
    await tick.waitReads(3, 'on the source after the rollback', since);
    await tick.stop();
    t.same(
      tick.violations,
      [],
      `every read of tick.log extends the earlier ones (${tick.reads.length} reads, ${tick.longest.length} bytes, ${tick.failed.length} unanswered)`,
    );
  }
  t.same(w.errors, [], 'psql reported no error');
  await w.stop();
  t.equal(w.proc.exitCode, 0, 'psql ended normally: one connection for the whole test');
  await assertCommitsAndKeysKept(t, c, w, mc, 'on the source');
  await assertNotRunningOn(t, c, c.dst);
}

/**
 * After psql has stopped: every acknowledged commit is in the table (read over a new
 * connection) with its payload and no row the client was not told about; memccp is stopped
 * and every STORED key reads back with its value (`where`: the host that runs the VM).
 */
export async function assertCommitsAndKeysKept(t: Test, c: Cluster, w: PgWriter, mc: MemcachedWriter, where: string): Promise<void> {
  const check = verifyRows(c, w);
  t.same(check.lost, [], `no acknowledged commit lost ${where} (${check.acked} acknowledged, ${check.rows} rows)`);
  t.same(check.phantom, [], 'no row the client was not told about');
  await mc.stop();
  const lost = await verifyKeys(c, mc);
  t.same(lost, [], `every STORED key reads back with its value ${where} (${mc.stored.size} keys, ${mc.failed.length} sets unacknowledged)`);
}
