/**
 * PostgreSQL, memcached and nginx's tick.log in the Debian guest across the other interruptions in post-copy
 * (docs/apps.md): the migration link cut, kill -9 of the destination's sidecar, and `tether abort`, each landing while the source
 * holds an ACK back (interruptDuringAppHold), so the destination's guest has committed and
 * stored in epochs the rollback takes back. The same checks as kill.test.ts: every
 * acknowledged commit and STORED key is there afterwards, on the same psql connection,
 * and no row the client was not told about; every read of tick.log extends the earlier ones.
 */
import t from 'tap';
import type { Test } from 'tap';
import type { Cluster } from '../../lab/cluster.ts';
import { bootDebianCluster } from '../../lab/apps/debian.ts';
import { startMemcachedWriter } from '../../lab/apps/memcached.ts';
import { startTickReader } from '../../lab/apps/nginx.ts';
import { startWriter } from '../../lab/apps/pg.ts';
import { APP_HOLD, assertAppsRolledBack, interruptDuringAppHold } from './scenario.ts';

/**
 * `staged`: the source may resume from a checkpoint after the held one. With the link cut
 * it goes on applying the checkpoints it had received when its hold ends (their ACKs never
 * reach the destination, whose gate keeps their outputs); so it does when the destination's
 * sidecar dies.
 */
async function scenario(t: Test, interrupt: (c: Cluster) => void | Promise<void>, staged = false): Promise<void> {
  const c = await bootDebianCluster(t, APP_HOLD);
  const w = startWriter(t, c);
  const mc = startMemcachedWriter(t, c);
  await w.waitAcked(10, 'before migrating');
  const tick = startTickReader(t, c);
  await mc.waitStored(10, 'before migrating');
  await tick.waitReads(3, 'before migrating');
  await assertAppsRolledBack(t, c, w, mc, await interruptDuringAppHold(t, c, w, () => interrupt(c)), { staged, tick });
}

t.test('migration link cut in post-copy: every acknowledged commit, STORED key and read survives', (t) =>
  scenario(t, (c) => c.linkDown(), true),
);

t.test("kill -9 of the destination's sidecar in post-copy: every acknowledged commit, STORED key and read survives", (t) =>
  // its QEMU's guard ends the guest there; the source's lease expires after its hold
  scenario(t, (c) => c.killDaemon(c.dst), true),
);

t.test('tether abort in post-copy: every acknowledged commit, STORED key and read survives', (t) =>
  scenario(t, async (c) => {
    const a = await c.tether(c.src, ['abort', c.vmName]);
    t.equal(a.code, 0, `abort accepted: ${a.stderr}`);
  }),
);
