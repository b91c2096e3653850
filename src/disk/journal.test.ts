import fc from 'fast-check';
import t from 'tap';
import type { DiskExtent } from '../migrate/outputs.ts';
import type { BlockDevice } from './block-device.ts';
import { BlockJournal, MAX_DISK_EXTENT_BYTES } from './journal.ts';

/** The image under the journal: a byte array that counts what reaches it. */
class MemImage implements BlockDevice {
  readonly canTrim = true;
  readonly bytes: Buffer;
  writes = 0;
  flushes = 0;
  constructor(readonly size: number) {
    this.bytes = Buffer.alloc(size);
  }
  async read(offset: number, length: number): Promise<Buffer> {
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
  for (const e of extents) e.data.copy(image, e.offset);
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
t.test('read-your-writes for every overlap pattern; the image holds exactly the acked epochs', async (t) => {
  await fc.assert(
    fc.asyncProperty(fc.array(opArb, { maxLength: 80 }), fc.integer({ min: 1, max: 3000 }), fc.boolean(), async (ops, maxExtent, fast) => {
      const image = fast ? new FastMemImage(SIZE) : new MemImage(SIZE);
      image.bytes.fill(7);
      const model = Buffer.from(image.bytes); // what the guest must read
      const j = new BlockJournal(image, { maxBytes: 1 << 30, maxExtentBytes: maxExtent });
      j.journal(1);
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
              if (e.data.length === 0 || e.data.length > maxExtent) throw new Error('extent size out of bounds');
              if (i > 0 && extents[i - 1]!.offset + extents[i - 1]!.data.length > e.offset) throw new Error('extents overlap or unordered');
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
            break;
          }
        }
        await j.flush(); // completes at once, writes nothing
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
    }),
    { numRuns: 400 },
  );
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
    ext.map((e) => [e.offset, e.data.length]),
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
    ext.reduce((s, e) => s + e.data.length, 0),
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

t.test('journal-write-through fault: the destination journal writes through', async (t) => {
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
