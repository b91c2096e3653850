import fs from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import type { BlockDevice } from './block-device.ts';
import { BlockJournal } from './journal.ts';
import { JournalLog, journalLogPath } from './journal-log.ts';
import { restartJournal } from './journal-restart.ts';

const SIZE = 64 * 1024;

class MemImage implements BlockDevice {
  readonly canTrim = true;
  readonly bytes = Buffer.alloc(SIZE, 7);
  writes = 0;
  readonly size = SIZE;
  read = async (o: number, l: number): Promise<Buffer> => Buffer.from(this.bytes.subarray(o, o + l));
  write = async (o: number, d: Buffer): Promise<void> => {
    this.writes++;
    d.copy(this.bytes, o);
  };
  flush = async (): Promise<void> => {};
  trim = async (o: number, l: number): Promise<void> => void this.bytes.fill(0, o, o + l);
  writeZeroes = async (o: number, l: number): Promise<void> => {
    this.writes++;
    this.bytes.fill(0, o, o + l);
  };
  close = async (): Promise<void> => {};
}

/**
 * The destination's journal as a kill -9 leaves it: epochs 1..3 written, 1 and 2
 * acknowledged (the source wrote them), 3 the final one, then writes of epoch 4 (after
 * the final barrier), the last one torn in the middle of its record.
 */
async function crashedJournal(dir: string, id: string, segmentBytes?: number): Promise<{ file: string; image: MemImage }> {
  const image = new MemImage();
  const file = journalLogPath(dir, 'vm', id);
  const wal = await JournalLog.create(file, { vm: 'vm', migrationId: id, size: SIZE }, { ...(segmentBytes ? { segmentBytes } : {}) });
  const j = new BlockJournal(image, { maxBytes: SIZE, wal });
  j.journal(1);
  for (let e = 1; e <= 3; e++) {
    await j.write(e * 4096, Buffer.alloc(4096, e));
    const ext = await j.seal(e);
    if (e < 3) {
      for (const x of ext) x.data!.copy(image.bytes, x.offset); // the source applies, then ACK (no zero extents here)
      j.release(e);
    }
  }
  await j.write(4 * 4096, Buffer.alloc(4096, 4));
  await j.trim(5 * 4096, 4096);
  const end = wal.size;
  await j.write(6 * 4096, Buffer.alloc(4096, 6)); // never acknowledged: torn below
  await wal.released(2);
  await wal.close();
  await fs.truncate(wal.file, end + 100);
  return { file, image };
}

/** A restart that finds the destination had asked to complete migration m1 with final epoch 3. */
const restartCompleting = (dir: string, image: MemImage) =>
  restartJournal({
    journalDir: dir,
    vm: 'vm',
    completingEpoch: 3,
    migrationId: 'm1',
    journal: { maxBytes: SIZE },
    openImage: async () => image,
  });

t.test('no log: nothing to do', async (t) => {
  const dir = t.testdir();
  const r = await restartJournal({
    journalDir: dir,
    vm: 'vm',
    completingEpoch: null,
    migrationId: null,
    journal: { maxBytes: SIZE },
    openImage: async () => new MemImage(),
  });
  t.same(r, { kind: 'none' });
});

// Each with the log in one file, and in segments of one epoch each (segments 0 and 1, epochs 1 and 2, deleted on their ACK).
for (const segmentBytes of [undefined, 4000]) {
  const seg = segmentBytes ? ', the log in segments' : '';
  t.test(`outcome unknown (completion asked): the journal is rebuilt from the log, never pass-through${seg}`, async (t) => {
    const dir = t.testdir();
    const { file, image } = await crashedJournal(dir, 'm1', segmentBytes);
    if (segmentBytes) t.same((await fs.readdir(dir)).sort(), ['vm.m1.wal.2', 'vm.m1.wal.3'], 'the acknowledged segments are gone');
    const before = Buffer.from(image.bytes);
    const r = await restartCompleting(dir, image);
    if (r.kind !== 'journal') throw new Error(`expected journal, got ${r.kind}`);
    t.equal(r.heldBytes, 8192, "epoch 4: one write and one trim (epochs <= 3 are the source's)");
    const j = r.device(image);
    t.equal(j.mode, 'journal');
    t.equal(j.openEpoch, 4, 'the guest writes on into epoch 4');
    t.same([...(await j.read(4 * 4096, 1))], [4], 'the acknowledged write of epoch 4 is served');
    t.same([...(await j.read(5 * 4096, 1))], [0], 'the trim reads as zeroes');
    t.same([...(await j.read(6 * 4096, 1))], [7], 'the torn, never acknowledged write is not');
    await j.write(7 * 4096, Buffer.alloc(10, 8));
    t.ok(image.bytes.equals(before), 'nothing reached the image');

    // The source answers rolled-back: nothing of it ever reaches the image; the log goes.
    j.discard();
    await j.drained();
    t.ok(image.bytes.equals(before));
    await t.rejects(fs.stat(file), { code: 'ENOENT' });
    t.same(await fs.readdir(dir), [], 'no segment left');
  });

  t.test(`outcome unknown, then completed: written back with the writes made after the restart${seg}`, async (t) => {
    const dir = t.testdir();
    const { file, image } = await crashedJournal(dir, 'm1', segmentBytes);
    const r = await restartCompleting(dir, image);
    if (r.kind !== 'journal') throw new Error(`expected journal, got ${r.kind}`);
    const j = r.device(image);
    await j.write(7 * 4096, Buffer.alloc(10, 8));
    // a second crash before the answer: the appended write is in the log too (torn tail was cut)
    const r2 = await restartCompleting(dir, image);
    if (r2.kind !== 'journal') throw new Error(`expected journal, got ${r2.kind}`);
    const j2 = r2.device(image);
    t.same([...(await j2.read(7 * 4096, 1))], [8], 'the write made after the first restart survived the second');
    await j2.markCompleted(3);
    j2.passThrough();
    await j2.drained();
    t.same(
      [image.bytes[3 * 4096], image.bytes[4 * 4096], image.bytes[5 * 4096], image.bytes[6 * 4096], image.bytes[7 * 4096]],
      [7, 4, 0, 7, 8],
    );
    t.equal(image.bytes[3 * 4096], 7, "epoch 3 is the source's to write (it did, before recording completion)");
    await t.rejects(fs.stat(file), { code: 'ENOENT' });
    t.same(await fs.readdir(dir), [], 'no segment left');
  });
}

t.test('completed recorded in the log (killed during write-back): finished before the disk is served', async (t) => {
  const dir = t.testdir();
  const image = new MemImage();
  const file = journalLogPath(dir, 'vm', 'm2');
  const wal = await JournalLog.create(file, { vm: 'vm', migrationId: 'm2', size: SIZE });
  const j = new BlockJournal(image, { maxBytes: SIZE, wal });
  j.journal(1);
  await j.write(0, Buffer.alloc(4096, 1));
  await j.seal(1);
  await j.write(4096, Buffer.alloc(4096, 2));
  await j.writeZeroes(8192, 4096);
  await j.markCompleted(1);
  await wal.close(); // killed before the write-back
  const r = await restartJournal({
    journalDir: dir,
    vm: 'vm',
    completingEpoch: null, // the completion records were already dropped
    migrationId: null,
    journal: { maxBytes: SIZE },
    openImage: async () => image,
  });
  t.same(r, { kind: 'written-back', bytes: 8192, finalEpoch: 1, migrationId: 'm2' });
  t.same([image.bytes[0], image.bytes[4096], image.bytes[8192]], [7, 2, 0], "epoch 2 written back; epoch 1 is the source's");
  await t.rejects(fs.stat(file), { code: 'ENOENT' });
});

t.test('no completion asked (or another migration): fenced, the log is dropped unread', async (t) => {
  const dir = t.testdir();
  const { file, image } = await crashedJournal(dir, 'm1');
  const before = Buffer.from(image.bytes);
  const r = await restartJournal({
    journalDir: dir,
    vm: 'vm',
    completingEpoch: 3,
    migrationId: 'other',
    journal: { maxBytes: SIZE },
    openImage: async () => image,
  });
  t.same(r, { kind: 'discarded' });
  t.ok(image.bytes.equals(before), 'nothing of it reached the image');
  await t.rejects(fs.stat(file), { code: 'ENOENT' });
  const r2 = await restartJournal({
    journalDir: path.join(dir, 'none'),
    vm: 'vm',
    completingEpoch: null,
    migrationId: null,
    journal: { maxBytes: SIZE },
    openImage: async () => image,
  });
  t.same(r2, { kind: 'none' });
});
