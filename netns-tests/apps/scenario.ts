/**
 * The interruption of the real-application scenarios: migrate the Debian VM and interrupt
 * the migration in post-copy (kill -9 of the destination's QEMU, a cut link, `tether
 * abort`) while the source withholds the ACK of a checkpoint
 * (a hold-acks-trigger fault, as the network scenarios), so that the destination's
 * PostgreSQL has committed transactions in epochs the source never acknowledges.
 */
import type { Test } from 'tap';
import type { Cluster, ClusterOptions } from '../harness.ts';
import { waitFor } from '../harness.ts';
import { armAckHold, heldFrames, holdFault } from '../scenarios.ts';
import type { MemcachedWriter } from './memcached.ts';
import type { PgWriter } from './pg.ts';

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
 * set STORED, with `memcached`). Then
 * `interrupt` (given the destination's QEMU pid). Returns the migration's result and the held checkpoint.
 */
export async function interruptDuringAppHold(
  t: Test,
  c: Cluster,
  w: PgWriter,
  interrupt: (destinationQemu: number) => void | Promise<void>,
  opts: { control?: boolean; duringHold?: () => void; memcached?: MemcachedWriter } = {},
): Promise<{ mig: Awaited<ReturnType<Cluster['migrate']>>; held: number; ackedInHold: number }> {
  const migrating = c.migrate();
  let ended = false;
  void migrating.finally(() => (ended = true));
  const notEnded = (what: string) => {
    if (ended) throw new Error(`the migration ended ${what}`);
  };
  await waitFor(async () => {
    notEnded('before the first checkpoint was acknowledged');
    return ((await c.status(c.dst)).migration?.ackedEpoch ?? 0) >= 1;
  }, 'the first checkpoint acknowledged');
  const onDest = Date.now();
  await waitFor(() => {
    notEnded("before the destination's guest acknowledged commits");
    return w.ackedSentSince(onDest) >= LIVE_COMMITS;
  }, `${LIVE_COMMITS} commits acknowledged by the destination's guest`);
  const held = await armAckHold(c, migrating);
  await waitFor(
    async () => {
      notEnded('during the hold');
      return ((await c.status(c.dst)).migration?.ackedEpoch ?? 0) >= held - 1;
    },
    `ACK(${held - 1}) processed on the destination`,
  );
  const from = Date.now();
  const ackedBefore = w.acked.length;
  opts.duringHold?.();
  if (opts.control) {
    await waitFor(
      () => {
        notEnded('during the hold');
        return w.ackedSentSince(from) >= 1 && (opts.memcached?.storedSentSince(from) ?? 1) >= 1;
      },
      `a commit${opts.memcached ? ' and a memcached set' : ''} sent during the hold acknowledged through the open gate`,
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
