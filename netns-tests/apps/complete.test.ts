/**
 * PostgreSQL, memcached and nginx in the Debian guest across a completed migration
 * (docs/apps.md): psql commits rows over one connection and every acknowledged commit is in
 * the destination's table afterwards, with no row the client was not told about; memccp stores unique keys continuously and every key the server answered STORED reads
 * back with its value on the destination afterwards; a curl download of /big.bin, held
 * open across the switchover (its reader paused, so the connection is there by
 * construction) and resumed during post-copy, completes on the same connection with the
 * right bytes (sha256 of the whole body, and a Range request against it); every read of
 * nginx's tick.log, before, during and after the migration, extends the earlier ones.
 */
import t from 'tap';
import { waitFor } from '../../lab/proc.ts';
import { assertNotRunningOn } from '../scenarios.ts';
import { bootDebianCluster, debianGuest } from '../../lab/apps/debian.ts';
import { startMemcachedWriter } from '../../lab/apps/memcached.ts';
import { fetchRange, startDownload, startTickReader } from '../../lab/apps/nginx.ts';
import { startWriter } from '../../lab/apps/pg.ts';
import { assertCommitsAndKeysKept } from './scenario.ts';

const MiB = 1024 * 1024;
/** More than the client's TCP receive buffer can hold (tcp_rmem max 6 MiB): bytes the destination's guest sent. */
const PAST_BUFFERS = 8 * MiB;

t.test(
  'PostgreSQL, memcached and nginx: a completed migration keeps every commit, every STORED key and the download on one connection',
  async (t) => {
    const g = debianGuest();
    const c = await bootDebianCluster(t, { holdCompletion: true });
    const w = startWriter(t, c);
    await w.waitAcked(10, 'before migrating');
    const mc = startMemcachedWriter(t, c);
    await mc.waitStored(10, 'before migrating');
    const tick = startTickReader(t, c);
    await tick.waitReads(3, 'before migrating');
    const dl = startDownload(t, c);
    await dl.waitBytes(MiB, 'before migrating');
    dl.pause();
    const migrating = c.migrate();
    let ended = false;
    void migrating.finally(() => (ended = true));
    await waitFor(async () => {
      if (ended) throw new Error(`the migration ended early: ${JSON.stringify(await migrating)}`);
      return ((await c.status(c.dst)).migration?.ackedEpoch ?? 0) >= 1;
    }, 'post-copy: the first checkpoint of the destination acknowledged');
    const onDest = Date.now();
    await mc.waitStored(5, "by the destination's guest in post-copy", onDest);
    await w.waitAcked(5, "by the destination's guest in post-copy", onDest);
    const pausedAt = dl.bytes;
    dl.resume();
    await dl.waitBytes(pausedAt + PAST_BUFFERS, "from the destination's guest in post-copy");
    t.notOk(ended, 'the download went on during post-copy (completion still held)');
    c.releaseCompletion();
    const mig = await migrating;
    t.equal(mig.code, 0, `migration completes: ${mig.stderr.slice(-2000)}`);
    t.equal(mig.result?.outcome, 'completed', 'outcome completed');
    t.equal((await c.status(c.dst)).state, 'running', 'VM runs on the destination');

    const r = await dl.done();
    t.equal(r.code, 0, `curl succeeded: ${dl.stderr.slice(-500)}`);
    t.equal(r.httpCode, 200, 'HTTP 200');
    t.equal(r.connects, 1, 'one connection for the whole body');
    t.equal(r.bytes, g.bigBytes, `the whole body (${r.bytes} bytes)`);
    t.equal(r.sha256, g.bigSha256, 'sha256 of the body is the file of the image');
    const [from, to] = [5 * MiB + 123, 9 * MiB + 4567];
    t.ok(
      (await fetchRange(c, from, to)).equals(dl.body().subarray(from, to + 1)),
      `Range ${from}-${to} from the destination matches the body`,
    );

    await mc.waitStored(5, 'on the destination after completion', Date.now());
    await tick.waitReads(3, 'on the destination after completion', Date.now());
    await tick.stop();
    t.same(
      tick.violations,
      [],
      `every read of tick.log extends the earlier ones (${tick.reads.length} reads, ${tick.longest.length} bytes, ${tick.failed.length} unanswered)`,
    );
    // the same psql connection went on across the switch; the table read over a new one
    await w.waitAcked(5, 'on the destination after completion', Date.now());
    await w.stop();
    await assertCommitsAndKeysKept(t, c, w, mc, 'on the destination');
    await assertNotRunningOn(t, c, c.src);
  },
);
