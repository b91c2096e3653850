import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import { findJournalLogs, JournalLog, LogKind, removeJournalLog, replayJournalLog, segmentFile } from './journal-log.ts';

const META = { vm: 'vm', migrationId: 'm1', size: 1 << 20 };

async function tmp(t: Test): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'tether-wal-seg-'));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Two writes of 1 KiB per epoch, epochs 1..n sealed one after the other. */
async function fill(wal: JournalLog, from: number, to: number): Promise<void> {
  for (let e = from; e <= to; e++) {
    await wal.write(e, e * 4096, Buffer.alloc(1024, e));
    await wal.write(e, e * 4096 + 1024, Buffer.alloc(1024, e));
    wal.sealed(e);
  }
  await wal.sync();
}

/** This process's descriptor of `file`. */
async function openFdOf(file: string): Promise<number> {
  for (const fd of await fs.readdir('/proc/self/fd'))
    if ((await fs.readlink(`/proc/self/fd/${fd}`).catch(() => '')) === file) return Number(fd);
  throw new Error(`${file} is not open`);
}

/** Files under `dir` this process still holds open although they were deleted. */
async function deletedButOpen(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const fd of await fs.readdir('/proc/self/fd')) {
    const target = await fs.readlink(`/proc/self/fd/${fd}`).catch(() => '');
    if (target.startsWith(dir) && target.endsWith(' (deleted)')) out.push(target);
  }
  return out;
}

/** A new log `vm.m1.wal` in a fresh directory (removed after the test), of `segmentBytes` segments when given. */
async function newLog(t: Test, segmentBytes?: number): Promise<{ dir: string; file: string; wal: JournalLog }> {
  const dir = await tmp(t);
  const file = path.join(dir, 'vm.m1.wal');
  const wal = await JournalLog.create(file, META, segmentBytes === undefined ? {} : { segmentBytes });
  return { dir, file, wal };
}

const epochsOf = (r: Awaited<ReturnType<typeof replayJournalLog>>) => [...new Set(r.records.map((x) => x.epoch))];

t.test(
  'segments: a barrier past segmentBytes starts the next; acknowledged segments are deleted; replay reads them all in order',
  async (t) => {
    const { dir, file, wal } = await newLog(t, 5000);
    await fill(wal, 1, 6);
    // every epoch adds 2 × (40 + 1024) bytes: each segment ends at the barrier after it passed 3000
    t.same(
      (await fs.readdir(dir)).sort(),
      ['vm.m1.wal', 'vm.m1.wal.1', 'vm.m1.wal.2'],
      'segments 0 (epochs 1-3), 1 (4-6) and the open one',
    );
    let r = await replayJournalLog(file);
    t.same(epochsOf(r), [1, 2, 3, 4, 5, 6], 'every record, in order, across segments');
    t.same(r.segments, [
      { n: 0, firstEpoch: 1 },
      { n: 1, firstEpoch: 4 },
      { n: 2, firstEpoch: 7 },
    ]);
    await wal.released(2);
    t.ok(await fs.stat(file), 'epoch 3 is not acknowledged: segment 0 stays');
    await wal.released(3);
    t.same((await fs.readdir(dir)).sort(), ['vm.m1.wal.1', 'vm.m1.wal.2'], 'ACK(3): segment 0 deleted');
    t.same(await findJournalLogs(dir, 'vm'), [file], 'the log is still found by its name without segment 0');
    r = await replayJournalLog(file, 4);
    t.same(epochsOf(r), [5, 6], 'a replay after epoch 4 keeps the rest');
    t.equal(wal.stats.segmentsRemoved, 1);

    // A restart: reopen appends to the last segment and numbers the next one on
    const torn = Buffer.alloc(17, 0x5a);
    await fs.appendFile(segmentFile(file, 2), torn);
    await wal.close();
    r = await replayJournalLog(file, 3);
    t.equal(r.ignoredBytes, 17, 'a torn tail of the last segment is ignored');
    const again = await JournalLog.reopen(file, r, { segmentBytes: 5000 });
    await fill(again, 7, 9);
    t.same((await fs.readdir(dir)).sort(), ['vm.m1.wal.1', 'vm.m1.wal.2', 'vm.m1.wal.3'], 'the tail cut, the next segment numbered on');
    r = await replayJournalLog(file, 3);
    t.same(epochsOf(r), [4, 5, 6, 7, 8, 9]);
    await again.completed(9);
    t.equal((await replayJournalLog(file)).completed, 9);
    await again.remove();
    t.same(await fs.readdir(dir), [], 'remove() deletes every segment');
  },
);

t.test(
  'a closed segment torn by a power loss ends the log there; a missing segment or one of another log is ERR_JOURNAL_LOG',
  async (t) => {
    const { dir, file, wal } = await newLog(t, 5000);
    await fill(wal, 1, 9);
    await wal.close();
    t.same((await replayJournalLog(file)).segments.length, 4);
    const s1 = segmentFile(file, 1);
    const bytes = await fs.readFile(s1);
    // a power loss before any FLUSH synced segment 1: its last record torn, the later
    // segments (writes no FLUSH covered) are not taken
    await fs.truncate(s1, bytes.length - 5);
    let r = await replayJournalLog(file);
    t.same(epochsOf(r), [1, 2, 3, 4, 5, 6], 'epoch 6 lost its second write only; nothing after the tear');
    t.equal(r.records.filter((x) => x.epoch === 6).length, 1);
    t.same(r.beyondTear, [2, 3]);
    const again = await JournalLog.reopen(file, r, { segmentBytes: 5000 });
    t.same((await fs.readdir(dir)).sort(), ['vm.m1.wal', 'vm.m1.wal.1'], 'reopen deletes the segments beyond the tear');
    await fill(again, 7, 7);
    await again.close();
    r = await replayJournalLog(file);
    t.same(epochsOf(r), [1, 2, 3, 4, 5, 6, 7], 'the log goes on from the tear');
    t.same((await fs.readdir(dir)).sort(), ['vm.m1.wal', 'vm.m1.wal.1', 'vm.m1.wal.2'], 'and rotates on: segment 2 is new');
    await fs.writeFile(segmentFile(file, 4), 'x');
    await t.rejects(replayJournalLog(file), { code: 'ERR_JOURNAL_LOG', message: /segment 3 is missing/ });
    await fs.rm(segmentFile(file, 4));
    const other = path.join(dir, 'vm.m2.wal');
    const w2 = await JournalLog.create(other, { ...META, migrationId: 'm2' }, { segmentBytes: 5000 });
    await fill(w2, 1, 9);
    await w2.close();
    await fs.rename(segmentFile(other, 2), segmentFile(file, 2));
    await t.rejects(replayJournalLog(file), { code: 'ERR_JOURNAL_LOG', message: /of this log/ });
    await fs.writeFile(path.join(dir, 'elsewhere'), '');
    t.same(
      (await findJournalLogs(dir, 'vm')).map((f) => path.basename(f)),
      ['vm.m1.wal', 'vm.m2.wal'],
    );
    await removeJournalLog(file);
    await removeJournalLog(other);
    t.same(await fs.readdir(dir), ['elsewhere'], 'removeJournalLog deletes what a log has, nothing else');
  },
);

t.test('a rotation does not fdatasync the closed segment; the next sync() does, before the current one', async (t) => {
  const { dir, wal } = await newLog(t, 5000);
  await fill(wal, 1, 6); // fill() syncs once at its end
  t.equal(wal.stats.syncs, 1, 'two rotations, one sync: the rotations synced nothing themselves');
  await wal.write(7, 0, Buffer.alloc(10));
  wal.sealed(7);
  await wal.write(8, 0, Buffer.alloc(6000));
  wal.sealed(8); // rotates: segment 3 closed, not synced
  await wal.released(8);
  await wal.sync();
  t.equal(wal.stats.syncs, 2);
  await wal.remove();
  t.same(await fs.readdir(dir), []);
});

t.test('segment size: records keep their kinds across a rotation', async (t) => {
  const { file, wal } = await newLog(t, 100);
  await wal.zeroes(1, 0, 1 << 30);
  wal.sealed(1);
  await wal.write(2, 0, Buffer.alloc(10, 1));
  await wal.completed(2);
  const r = await replayJournalLog(file);
  t.same(
    r.records.map((x) => [x.kind, x.epoch]),
    [
      [LogKind.Zeroes, 1],
      [LogKind.Write, 2],
      [LogKind.Completed, 2],
    ],
  );
  t.equal(r.segments.length, 2);
  await wal.remove();
});

/**
 * A log of 200-byte segments after one rotation: epoch 1 in segment 0 (closed, not synced
 * yet), epoch 2 in segment 1; and a sync() started that has taken segment 0 but whose
 * fdatasync cannot have completed (only microtasks ran since).
 */
async function rotatedWithSyncInFlight(t: Test) {
  const { dir, file, wal } = await newLog(t, 200);
  await wal.write(1, 0, Buffer.alloc(300, 1));
  wal.sealed(1); // past 200 bytes: segment 1 is opened, segment 0 waits for the next sync
  await wal.write(2, 4096, Buffer.alloc(10, 2));
  const flush = wal.sync();
  for (let i = 0; i < 5; i++) await null;
  return { dir, file, wal, flush };
}

t.test('a segment deleted while a FLUSH syncs it: its descriptor is closed, the FLUSH resolves', async (t) => {
  const { dir, file, wal, flush } = await rotatedWithSyncInFlight(t);
  await wal.released(1); // segment 0 holds only epoch 1: deleted
  await flush;
  t.equal(wal.stats.segmentsRemoved, 1);
  t.same(await deletedButOpen(dir), [], "segment 0's descriptor is closed once the FLUSH no longer uses it");
  await wal.sync();
  t.same(epochsOf(await replayJournalLog(file)), [2]);
  await wal.remove();
});

t.test('two FLUSHes in flight after a rotation: each fdatasyncs the closed segment itself', async (t) => {
  const { wal, flush: a } = await rotatedWithSyncInFlight(t);
  const b = wal.sync(); // B must not return before segment 0 is durable, whatever A's progress
  await Promise.all([a, b]);
  t.equal(wal.stats.segmentSyncs, 2, 'segment 0 synced by both');
  await wal.sync();
  t.equal(wal.stats.segmentSyncs, 2, 'once durable, a later FLUSH does not sync it again');
  await wal.remove();
});

t.test('a failed fdatasync is sticky: no later FLUSH or write of the log succeeds', async (t) => {
  const { file, wal } = await newLog(t);
  await wal.write(1, 0, Buffer.alloc(100, 1));
  // the segment's descriptor becomes /dev/null (open takes the lowest free number), where fdatasync fails (EINVAL)
  const fd = await openFdOf(file);
  fsSync.closeSync(fd);
  const devNull = fsSync.openSync('/dev/null', 'r');
  t.equal(devNull, fd, "/dev/null took the segment's descriptor number");
  await t.rejects(wal.sync(), { code: 'ERR_JOURNAL_LOG' }, 'the FLUSH fails');
  // the descriptor works again (the segment itself under the same number), as a kernel that
  // dropped the failed pages reports the next fdatasync as a success
  fsSync.closeSync(devNull);
  t.equal(fsSync.openSync(file, 'r+'), fd, 'the segment back under its number');
  await t.rejects(wal.sync(), { code: 'ERR_JOURNAL_LOG' }, 'a later FLUSH still fails');
  await t.rejects(wal.write(1, 4096, Buffer.alloc(10, 2)), { code: 'ERR_JOURNAL_LOG' }, 'and so does a later write');
  await wal.close();
});

t.test('FLUSHes in flight across rotations all resolve; every record replays', async (t) => {
  const { dir, file, wal } = await newLog(t, 200);
  const syncs: Promise<void>[] = [];
  for (let e = 1; e <= 20; e++) {
    const w = wal.write(e, e * 512, Buffer.alloc(300, e));
    syncs.push(wal.sync()); // a FLUSH while the write is queued, then the rotation
    wal.sealed(e);
    await w;
    syncs.push(wal.sync());
    if (e % 4 === 0) await wal.released(e - 2);
  }
  await Promise.all(syncs);
  t.equal(wal.stats.syncs, 40);
  const r = await replayJournalLog(file, 18);
  t.same(epochsOf(r), [19, 20]);
  t.ok(wal.stats.segmentsRemoved > 0, `${wal.stats.segmentsRemoved} segments deleted meanwhile`);
  t.same(await deletedButOpen(dir), [], 'no descriptor of a deleted segment is kept open (its disk space would stay taken)');
  await wal.remove();
  t.same(await fs.readdir(dir), []);
});
