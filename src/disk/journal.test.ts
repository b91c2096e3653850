import fc from 'fast-check';
import t from 'tap';
import { extentLength } from '../epoch/outputs.ts';
import { MAX_DISK_ZERO_BYTES } from '../checkpoint/messages.ts';
import type { DiskExtent } from '../epoch/outputs.ts';
import type { BlockDevice } from './block-device.ts';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { BlockJournal, MAX_DISK_EXTENT_BYTES } from './journal.ts';
import { JournalLog, replayJournalLog } from './journal-log.ts';

/** The image under the journal: a byte array that counts what reaches it. */
class MemImage implements BlockDevice {
  readonly canTrim = true;
  readonly bytes: Buffer;
  writes = 0;
  flushes = 0;
  reads = 0;
  constructor(readonly size: number) {
    this.bytes = Buffer.alloc(size);
  }
  async read(offset: number, length: number): Promise<Buffer> {
    this.reads++;
    await Promise.resolve();
    return Buffer.from(this.bytes.subarray(offset, offset + length));
  }
  async write(offset: number, data: Buffer): Promise<void> {
    this.writes++;
    data.copy(this.bytes, offset);
  }
  async flush(): Promise<void> {
    this.flushes++;
  }
  async trim(offset: number, length: number): Promise<void> {
    this.writes++;
    this.bytes.fill(0, offset, offset + length);
  }
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.writes++;
    this.bytes.fill(0, offset, offset + length);
  }
  async close(): Promise<void> {}
}

/** An image whose reads can complete at once (the page-cache hit of FileBlockDevice.readNow). */
class FastMemImage extends MemImage {
  readNow(offset: number, length: number): Buffer | undefined {
    return Buffer.from(this.bytes.subarray(offset, offset + length));
  }
}

/** What the source does with checkpoint k's extents before ACK(k). */
function applyExtents(image: Buffer, extents: DiskExtent[]): void {
  for (const e of extents) {
    if (e.zero) image.fill(0, e.offset, e.offset + e.length);
    else e.data.copy(image, e.offset);
  }
}

const SIZE = 4096;

type Op =
  | { op: 'write'; offset: number; length: number; fill: number; now: boolean }
  | { op: 'trim' | 'zero'; offset: number; length: number }
  | { op: 'read'; offset: number; length: number; now: boolean }
  | { op: 'seal' }
  | { op: 'ack' };

const range = fc
  .tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 700 }))
  .map(([offset, length]) => ({ offset, length: Math.min(length, SIZE - offset) }));

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .tuple(range, fc.integer({ min: 1, max: 255 }), fc.boolean())
      .map(([r, fill, now]) => ({ op: 'write' as const, ...r, fill, now })),
  },
  { weight: 1, arbitrary: range.map((r) => ({ op: 'trim' as const, ...r })) },
  { weight: 1, arbitrary: range.map((r) => ({ op: 'zero' as const, ...r })) },
  { weight: 3, arbitrary: fc.tuple(range, fc.boolean()).map(([r, now]) => ({ op: 'read' as const, ...r, now })) },
  { weight: 1, arbitrary: fc.constant({ op: 'seal' as const }) },
  { weight: 1, arbitrary: fc.constant({ op: 'ack' as const }) },
);

/** Pattern bytes that differ at every position, so a misplaced copy shows. */
function pattern(length: number, fill: number, offset: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (fill + offset + i) & 0xff || 1;
  return b;
}

// `now` ops take the synchronous fast paths (writeNow/readNow, what the NBD server tries
// first) where the image offers them: they must be indistinguishable from write/read.
// With the write-ahead log, the journal rebuilt from the log (after a crash in the middle of
// appending one more, unacknowledged, write: its record cut at a random byte, or its bytes
// garbled) must read exactly what the guest was acknowledged.
t.test('read-your-writes for every overlap pattern; the image holds exactly the acked epochs; the log replays it', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'tether-wal-'));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  let run = 0;
  let rotated = 0;
  let pruned = 0;
  const tail = fc.record({ cut: fc.double({ min: 0, max: 1, noNaN: true }), garble: fc.boolean(), fill: fc.integer({ min: 1, max: 255 }) });
  await fc.assert(
    fc.asyncProperty(
      fc.array(opArb, { maxLength: 80 }),
      fc.integer({ min: 1, max: 3000 }),
      fc.boolean(),
      fc.option(tail),
      // log segments: none, or small enough that barriers rotate and ACKs delete them
      fc.constantFrom(Infinity, 300, 3000),
      async (ops, maxExtent, fast, withLog, segmentBytes) => {
        const image = fast ? new FastMemImage(SIZE) : new MemImage(SIZE);
        image.bytes.fill(7);
        const model = Buffer.from(image.bytes); // what the guest must read
        const logFile = path.join(dir, `vm.m${run++}.wal`);
        const wal = withLog ? await JournalLog.create(logFile, { vm: 'vm', migrationId: 'm', size: SIZE }, { segmentBytes }) : undefined;
        const j = new BlockJournal(image, { maxBytes: 1 << 30, maxExtentBytes: maxExtent, ...(wal ? { wal } : {}) });
        j.journal(1);
        let lastAcked = 0;
        let epoch = 1;
        const sealed: { epoch: number; extents: DiskExtent[]; model: Buffer }[] = [];
        const acked = Buffer.from(image.bytes); // initial image + acked epochs, as the source writes them
        for (const o of ops) {
          switch (o.op) {
            case 'write': {
              const data = pattern(o.length, o.fill, o.offset);
              if (!(o.now && j.writeNow(o.offset, data))) await j.write(o.offset, data);
              data.fill(0); // the journal must have copied it
              pattern(o.length, o.fill, o.offset).copy(model, o.offset);
              break;
            }
            case 'trim':
            case 'zero':
              if (o.op === 'trim') await j.trim(o.offset, o.length);
              else await j.writeZeroes(o.offset, o.length);
              model.fill(0, o.offset, o.offset + o.length);
              break;
            case 'read': {
              const got = (o.now ? j.readNow(o.offset, o.length) : undefined) ?? (await j.read(o.offset, o.length));
              if (o.now && fast && got.length !== o.length) throw new Error('readNow declined over a fast image');
              if (!got.equals(model.subarray(o.offset, o.offset + o.length))) throw new Error(`read ${o.offset}+${o.length} differs`);
              break;
            }
            case 'seal': {
              const extents = await j.seal(epoch);
              for (let i = 0; i < extents.length; i++) {
                const e = extents[i]!;
                const len = extentLength(e);
                if (len === 0 || len > (e.zero ? MAX_DISK_ZERO_BYTES : maxExtent)) throw new Error('extent size out of bounds');
                if (i > 0 && extents[i - 1]!.offset + extentLength(extents[i - 1]!) > e.offset)
                  throw new Error('extents overlap or unordered');
              }
              sealed.push({ epoch, extents, model: Buffer.from(model) });
              epoch++;
              break;
            }
            case 'ack': {
              const s = sealed.shift();
              if (!s) break;
              applyExtents(image.bytes, s.extents); // the source, before ACK
              applyExtents(acked, s.extents);
              // The source's image after applying checkpoint k is the guest's disk at barrier k.
              if (!image.bytes.equals(s.model)) throw new Error(`image after epoch ${s.epoch} is not the disk at its barrier`);
              j.release(s.epoch);
              lastAcked = s.epoch;
              break;
            }
          }
          await j.flush(); // writes nothing to the image (syncs the log)
        }
        if (wal && withLog) {
          // A crash while one more write is being appended: its record is torn.
          const before = wal.size;
          const extra = pattern(100, withLog.fill, 0);
          await j.write(SIZE - 100, extra);
          await wal.released(lastAcked); // the deletions of acknowledged segments have run
          const full = wal.size - before;
          const keep = Math.floor(withLog.cut * (full - 1));
          if (withLog.garble) {
            const fh = await fs.open(wal.file, 'r+');
            await fh.write(Buffer.alloc(full - keep, 0x5a), 0, full - keep, before + keep);
            await fh.close();
          } else await fs.truncate(wal.file, before + keep);
          const replay = await replayJournalLog(logFile, lastAcked);
          if (segmentBytes === Infinity && replay.segments.length !== 1) throw new Error('a log without segments rotated');
          if (replay.validEnd !== before) throw new Error(`replay ended at ${replay.validEnd}, the acked records end at ${before}`);
          // The source holds epochs <= lastAcked (image.bytes); the rebuilt journal over it is the guest's disk.
          const copy = new MemImage(SIZE);
          image.bytes.copy(copy.bytes);
          const r = BlockJournal.recover(copy, replay, { maxBytes: 1 << 30, nextEpoch: epoch });
          if (!(await r.read(0, SIZE)).equals(model)) throw new Error('the journal rebuilt from the log differs from the acked state');
          r.passThrough();
          await r.drained();
          if (!copy.bytes.equals(model)) throw new Error('the rebuilt journal written back differs from the acked state');
          pattern(100, withLog.fill, 0).copy(model, SIZE - 100); // the live journal has the extra write
        }
        if (image.writes !== 0) throw new Error('journal mode wrote the shared image');
        if (!image.bytes.equals(acked)) throw new Error('image differs from initial + acked epochs');
        // Everything released and pending still reads back right; then write-through.
        const all = await j.read(0, SIZE);
        if (!all.equals(model)) throw new Error('full read differs');
        j.passThrough();
        await j.flush();
        if (j.mode !== 'pass-through') throw new Error('not pass-through after drain');
        if (!image.bytes.equals(model)) throw new Error('drained image differs from the guest view');
        if (j.heldBytes !== 0) throw new Error('bytes still held');
        if (wal && existsSync(logFile)) throw new Error('the log outlived the write-back');
        if (wal && (await fs.readdir(dir)).some((n) => n.startsWith(path.basename(logFile))))
          throw new Error('a log segment outlived the write-back');
        if (wal && wal.stats.segments > 1) rotated++;
        if (wal && wal.stats.segmentsRemoved > 0) pruned++;
      },
    ),
    { numRuns: 400 },
  );
  // (deletion on ACK is shown deterministically in journal-log.test.ts; here it is rarer)
  t.ok(rotated > 0, `runs whose log rotated: ${rotated} (that also deleted acknowledged segments: ${pruned})`);
});

t.test('pass-through: writes, zeroes and flush reach the image', async (t) => {
  const image = new MemImage(SIZE);
  const j = new BlockJournal(image, { maxBytes: 1024 });
  await j.write(10, Buffer.from('abc'), { fua: true });
  await j.writeZeroes(11, 1);
  await j.flush();
  t.same([...image.bytes.subarray(10, 13)], [0x61, 0, 0x63]);
  t.equal(image.flushes, 1);
  t.equal(j.heldBytes, 0);
  t.same(await j.seal(1), [], 'nothing to seal outside journal mode');
});

t.test('seal coalesces adjacent writes and splits extents larger than a DISK frame', async (t) => {
  const size = 3 * MAX_DISK_EXTENT_BYTES;
  const j = new BlockJournal(new MemImage(size), { maxBytes: size });
  j.journal(5);
  await j.write(4096, Buffer.alloc(4096, 2));
  await j.write(0, Buffer.alloc(4096, 1));
  await j.write(8192, Buffer.alloc(100, 3));
  await j.write(MAX_DISK_EXTENT_BYTES, Buffer.alloc(MAX_DISK_EXTENT_BYTES + 10, 4));
  const ext = await j.seal(5);
  t.same(
    ext.map((e) => [e.offset, extentLength(e)]),
    [
      [0, 8292],
      [MAX_DISK_EXTENT_BYTES, MAX_DISK_EXTENT_BYTES],
      [2 * MAX_DISK_EXTENT_BYTES, 10],
    ],
  );
  await t.rejects(j.seal(5), { code: 'ERR_JOURNAL_STATE' }, 'epoch 6 is open now');
  t.same(await j.seal(6), [], 'an epoch without writes seals empty');
});

t.test('a full journal delays the write until a release frees space; quiesce admits it', async (t) => {
  const image = new MemImage(SIZE);
  const j = new BlockJournal(image, { maxBytes: 1000 });
  j.journal(1);
  await j.write(0, Buffer.alloc(800, 1));
  await j.seal(1);
  t.notOk(j.writeNow(1000, Buffer.alloc(300, 2)), 'the fast path declines a write that does not fit');
  let done = false;
  const w = j.write(1000, Buffer.alloc(300, 2)).then(() => (done = true));
  await new Promise((r) => setTimeout(r, 20));
  t.notOk(done, 'write waits: 800 + 300 > 1000');
  t.notOk(j.writeNow(1100, Buffer.alloc(10, 2)), 'nor overtakes a waiting write even when it would fit');
  t.same([...(await j.read(1000, 1))], [0], 'the waiting write is not visible');
  applyExtents(image.bytes, []); // (the source would write epoch 1 here)
  j.release(1);
  await w;
  t.ok(done, 'released epoch 1: the write completes');
  t.equal(j.stats.delayedWrites, 1);

  // Only the open epoch is held: nothing but the barrier can free space.
  await j.write(0, Buffer.alloc(600, 3));
  let done2 = false;
  const w2 = j.write(2000, Buffer.alloc(300, 4)).then(() => (done2 = true));
  await new Promise((r) => setTimeout(r, 20));
  t.notOk(done2, 'waits while the open epoch is full');
  j.quiesce();
  await w2;
  t.ok(done2, 'quiesce (before stop) admits it');
  const ext = await j.seal(2);
  t.equal(
    ext.reduce((s, e) => s + extentLength(e), 0),
    1200,
    'the admitted write belongs to the sealed epoch',
  );
  t.equal(image.writes, 0);
});

t.test('a write larger than the bound is admitted into an empty journal', async (t) => {
  const j = new BlockJournal(new MemImage(SIZE), { maxBytes: 100 });
  j.journal(1);
  await j.write(0, Buffer.alloc(2000, 1));
  t.equal(j.heldBytes, 2000);
});

t.test('discard drops everything, fails waiting and later requests, never touches the image', async (t) => {
  const image = new MemImage(SIZE);
  const j = new BlockJournal(image, { maxBytes: 100 });
  j.journal(1);
  await j.write(0, Buffer.alloc(100, 1));
  const waiting = j.write(200, Buffer.alloc(50, 2));
  j.discard();
  await t.rejects(waiting, { code: 'ERR_JOURNAL_DISCARDED' });
  await t.rejects(j.write(0, Buffer.alloc(1)), { code: 'ERR_JOURNAL_DISCARDED' });
  await t.rejects(async () => j.read(0, 1), { code: 'ERR_JOURNAL_DISCARDED' });
  j.passThrough();
  t.equal(j.mode, 'discarded', 'no way back from discarded');
  t.equal(image.writes, 0);
  t.equal(j.heldBytes, 0);
});

t.test('passThrough writes the journal back before any later write', async (t) => {
  const image = new MemImage(SIZE);
  const j = new BlockJournal(image, { maxBytes: SIZE });
  j.journal(1);
  await j.write(0, Buffer.from('old!'));
  j.passThrough();
  const later = j.write(0, Buffer.from('new'));
  t.same((await j.read(0, 4)).toString(), 'old!', 'reads served during the drain');
  await later;
  t.same(image.bytes.subarray(0, 4).toString(), 'new!', 'the later write landed over the drained one');
  t.equal(image.flushes, 1, 'the drained journal was made durable');
  t.equal(j.mode, 'pass-through');
});

t.test('the writeBackHold hook: the write-back stops after its first extent', async (t) => {
  const image = new MemImage(SIZE);
  let held!: () => void;
  const reached = new Promise<void>((r) => (held = r));
  const j = new BlockJournal(image, {
    maxBytes: SIZE,
    writeBackHold: () => {
      held();
      return new Promise<void>(() => {});
    },
  });
  j.journal(1);
  await j.write(0, Buffer.from('a'));
  await j.write(2048, Buffer.from('b'));
  t.equal(j.extentCount, 2);
  j.passThrough();
  await reached;
  t.equal(image.bytes[0], 0x61, 'the first extent is in the image');
  t.equal(image.bytes[2048], 0, 'the second is not');
  t.equal(image.flushes, 0, 'nothing was made durable yet');
  t.equal(j.mode, 'draining');
});

t.test('the writeThrough option: the destination journal writes through', async (t) => {
  const image = new MemImage(SIZE);
  const j = new BlockJournal(image, { maxBytes: SIZE, writeThrough: true });
  j.journal(1);
  await j.write(0, Buffer.from('x'));
  t.equal(image.bytes[0], 0x78);
  t.same(await j.seal(1), []);
});

t.test('bad requests and options are typed errors', async (t) => {
  const j = new BlockJournal(new MemImage(SIZE), { maxBytes: 10 });
  await t.rejects(async () => j.read(SIZE - 1, 2), { code: 'ERR_DISK_RANGE' });
  await t.rejects(async () => j.write(-1, Buffer.alloc(1)), { code: 'ERR_DISK_RANGE' });
  t.throws(() => new BlockJournal(new MemImage(SIZE), { maxBytes: 0 }), { code: 'ERR_JOURNAL_INVALID_OPTION' });
  t.throws(() => new BlockJournal(new MemImage(SIZE), { maxBytes: 1, maxExtentBytes: MAX_DISK_EXTENT_BYTES + 1 }), {
    code: 'ERR_JOURNAL_INVALID_OPTION',
  });
  j.journal(1);
  t.throws(() => j.journal(1), { code: 'ERR_JOURNAL_STATE' });
});

/** Lets queued promise callbacks and I/O callbacks run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
}

t.test('unquiesce: when no barrier follows quiesce (the final loop iteration), the bound holds again', async (t) => {
  const j = new BlockJournal(new MemImage(SIZE), { maxBytes: 1000 });
  j.journal(1);
  await j.write(0, Buffer.alloc(800, 1));
  j.quiesce();
  await j.write(1000, Buffer.alloc(300, 2));
  t.equal(j.heldBytes, 1100, 'quiescing: admitted past the bound (QEMU stop drains it)');
  j.unquiesce();
  t.notOk(j.writeNow(2000, Buffer.alloc(10, 3)), 'the fast path declines again');
  let done = false;
  const w = j.write(2000, Buffer.alloc(10, 3)).then(() => (done = true));
  await settle();
  t.notOk(done, 'the bound is armed again without a seal');
  t.equal(j.heldBytes, 1100);
  j.passThrough(); // completion: the open epoch goes to the image, the write follows
  await w;
  t.ok(done);
});

/** A large device with no bytes behind it: only zero extents may be put on it. */
class SizedImage implements BlockDevice {
  readonly canTrim = true;
  zeroed: [number, number][] = [];
  constructor(readonly size: number) {}
  read = async (_o: number, length: number): Promise<Buffer> => Buffer.alloc(length);
  write = async (): Promise<void> => {
    throw new Error('no data writes expected');
  };
  flush = async (): Promise<void> => {};
  trim = async (): Promise<void> => {};
  writeZeroes = async (offset: number, length: number): Promise<void> => void this.zeroed.push([offset, length]);
  close = async (): Promise<void> => {};
}

t.test('TRIM and WRITE_ZEROES are zero extents: no buffer however long, counted at their length, sealed without a buffer', async (t) => {
  const GiB = 1024 * 1024 * 1024;
  const image = new SizedImage(8 * GiB);
  const j = new BlockJournal(image, { maxBytes: 4 * GiB });
  j.journal(1);
  const before = process.memoryUsage().arrayBuffers;
  await j.trim(0, 2 * GiB);
  await j.writeZeroes(3 * GiB, GiB);
  t.equal(j.heldBytes, 3 * GiB, 'counted against journalMaxBytes at their length');
  t.equal(j.epochs()[0]!.map.dataBytes, 0, 'no data held');
  t.ok(process.memoryUsage().arrayBuffers - before < 64 * 1024 * 1024, 'nothing of their size allocated');
  let done = false;
  const w = j.writeZeroes(5 * GiB, 2 * GiB).then(() => (done = true));
  await settle();
  t.notOk(done, 'a TRIM waits for room like a write');
  const ext = await j.seal(1);
  t.equal(ext.length, 3, '3 GiB in zero extents of at most MAX_DISK_ZERO_BYTES (1 GiB)');
  t.ok(
    ext.every((e) => e.zero === true && e.data === undefined && e.length === MAX_DISK_ZERO_BYTES),
    'every extent a zero extent without a buffer',
  );
  t.same(
    ext.map((e) => e.offset),
    [0, GiB, 3 * GiB],
    'in offset order',
  );
  j.release(1);
  await w;
  const zeroRead = await j.read(5 * GiB, 8);
  t.same([...zeroRead], [0, 0, 0, 0, 0, 0, 0, 0]);
  j.passThrough();
  await j.drained();
  t.same(image.zeroed, [[5 * GiB, 2 * GiB]], 'written back as WRITE_ZEROES, not as bytes');
});

t.test(
  'with the write-ahead log: a write completes once its record is written; FLUSH and FUA fdatasync; the log goes with the journal',
  async (t) => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'tether-wal-'));
    t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
    const file = path.join(dir, 'vm.m1.wal');
    const wal = await JournalLog.create(file, { vm: 'vm', migrationId: 'm1', size: SIZE });
    const image = new MemImage(SIZE);
    const j = new BlockJournal(image, { maxBytes: SIZE, wal });
    j.journal(1);
    t.ok(j.writeNow(0, Buffer.alloc(10, 1)), 'the fast path appends the record on the spot');
    let r = await replayJournalLog(file);
    t.same(
      r.records.map((x) => [x.kind, x.epoch]),
      [[1, 1]],
      'the write is in the log once it completed',
    );
    const syncs = wal.stats.syncs;
    await j.flush();
    t.equal(wal.stats.syncs, syncs + 1, 'FLUSH: fdatasync of the log');
    await j.write(100, Buffer.alloc(10, 2), { fua: true });
    t.equal(wal.stats.syncs, syncs + 2, 'FUA: fdatasync of the log');
    await j.seal(1);
    await j.trim(200, 1000);
    await j.writeZeroes(2000, 100, { fua: true });
    t.equal(wal.stats.syncs, syncs + 3);
    t.same(
      j.figures().log,
      { records: 4, bytes: wal.stats.bytes, writes: wal.stats.writes, syncs: syncs + 3, segmentSyncs: 0, segments: 1, segmentsRemoved: 0 },
      "the log's figures in the journal's (tether status)",
    );
    r = await replayJournalLog(file);
    t.same(
      r.records.map((x) => [x.kind, x.epoch, 'offset' in x ? x.offset : -1]),
      [
        [1, 1, 0],
        [1, 1, 100],
        [2, 2, 200],
        [2, 2, 2000],
      ],
    );
    t.equal(r.meta.migrationId, 'm1');
    t.equal(image.writes, 0, 'the image is never written in journal mode');
    await j.markCompleted(1);
    t.equal((await replayJournalLog(file)).completed, 1, 'completion recorded in the log');
    j.passThrough();
    await j.drained();
    await t.rejects(fs.stat(file), { code: 'ENOENT' }, 'written back: the log is removed');

    const file2 = path.join(dir, 'vm.m2.wal');
    const j2 = new BlockJournal(new MemImage(SIZE), {
      maxBytes: SIZE,
      wal: await JournalLog.create(file2, { vm: 'vm', migrationId: 'm2', size: SIZE }),
    });
    j2.journal(1);
    await j2.write(0, Buffer.alloc(10, 1));
    j2.discard();
    await j2.drained();
    await t.rejects(fs.stat(file2), { code: 'ENOENT' }, 'discarded: the log is removed');
  },
);

t.test('a read the unreleased epochs cover entirely never reaches the image', async (t) => {
  const image = new MemImage(1 << 20);
  image.bytes.fill(0xee);
  const j = new BlockJournal(image, { maxBytes: 1 << 20 });
  j.journal(1);
  await j.write(0, Buffer.alloc(4096, 1));
  await j.seal(1);
  await j.write(4096, Buffer.alloc(4096, 2));
  await j.trim(8192, 4096);
  await j.write(2000, Buffer.alloc(100, 3));
  const want = Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 2), Buffer.alloc(4096)]);
  want.fill(3, 2000, 2100);
  t.ok((await j.read(0, 12288)).equals(want), 'epochs 1 and 2 with a zero extent, oldest first');
  t.ok((await j.read(1000, 10000)).equals(want.subarray(1000, 11000)));
  t.ok(j.readNow(500, 8000)?.equals(want.subarray(500, 8500)), 'readNow answers it from memory');
  t.equal(image.reads, 0, 'the image was not read');
  t.ok((await j.read(12000, 1000)).equals(Buffer.concat([want.subarray(12000), Buffer.alloc(712, 0xee)])), 'past the journal');
  t.equal(image.reads, 1, 'a gap reads the image under the journal');
  j.release(1);
  const under = Buffer.alloc(4096, 0xee);
  under.fill(3, 2000, 2100);
  t.ok((await j.read(0, 4096)).equals(under), 'epoch 1 released: the image (the source wrote it there) under epoch 2');
  t.equal(image.reads, 2);
  t.equal(j.readNow(0, 10), undefined, 'not covered, and the image has no fast path');
});
