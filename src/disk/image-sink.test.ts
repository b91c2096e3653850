import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import t, { type Test } from 'tap';
import type { Checkpoint } from '../checkpoint/assembler.ts';
import { decodeStage, encodeStage } from '../checkpoint/stage.ts';
import { CheckpointStore } from '../checkpoint/store.ts';
import { ImageSink } from './image-sink.ts';

const RAM = 16 * 4096;
const IMAGE = 64 * 1024;

function ckpt(epoch: number, disk: [number, number, number][]): Checkpoint {
  return {
    epoch,
    pfns: new Uint32Array([epoch]),
    zeroMask: new Uint8Array([1]),
    data: Buffer.alloc(0),
    disk: disk.map(([offset, len, fill]) => ({ offset, data: Buffer.alloc(len, fill) })),
    devstate: Buffer.from(`dev${epoch}`),
  };
}

async function setup(t: Test) {
  const root = await mkdtemp(path.join(os.tmpdir(), 'tether-sink-'));
  t.teardown(() => rm(root, { recursive: true, force: true }));
  const ramPath = path.join(root, 'ram');
  const image = path.join(root, 'disk.img');
  await writeFile(ramPath, Buffer.alloc(RAM));
  await writeFile(image, Buffer.alloc(IMAGE, 0xee));
  const sinks: ImageSink[] = [];
  const make = () => {
    const disk = new ImageSink(image);
    sinks.push(disk);
    return new CheckpointStore({ dir: path.join(root, 'ckpt'), ramPath, ramBytes: RAM, disk });
  };
  t.teardown(async () => {
    for (const s of sinks) await s.close();
  });
  return { root, image, make };
}

t.test('applying a checkpoint writes its disk extents into the image file', async (t) => {
  const { image, make } = await setup(t);
  const store = make();
  await store.init0(Buffer.from('dev0'));
  await store.apply(
    ckpt(1, [
      [0, 4096, 1],
      [8192, 512, 2],
    ]),
  );
  await store.apply(ckpt(2, [[4096 + 100, 8000, 3]]));
  const want = Buffer.alloc(IMAGE, 0xee);
  want.fill(1, 0, 4096);
  want.fill(2, 8192, 8192 + 512);
  want.fill(3, 4196, 4196 + 8000);
  t.ok((await readFile(image)).equals(want), 'image = initial + extents of both checkpoints');
});

t.test('an extent past the end of the image fails the apply and grows nothing', async (t) => {
  const { image, make } = await setup(t);
  const store = make();
  await store.init0(Buffer.from('dev0'));
  await t.rejects(store.apply(ckpt(1, [[IMAGE - 10, 20, 1]])), { code: 'ERR_DISK_RANGE' });
  t.equal((await readFile(image)).length, IMAGE);
  t.equal(store.lastApplied().epoch, 0, 'checkpoint 1 is not recorded as applied');
});

t.test('recovery re-applies the persisted stage: its disk extents reach the image', async (t) => {
  const { root, image, make } = await setup(t);
  const first = make();
  await first.init0(Buffer.from('dev0'));
  await first.apply(ckpt(1, [[0, 100, 1]]));
  // The sidecar died right after persisting stage 2: none of its extents were written.
  await writeFile(path.join(root, 'ckpt', 'stage.bin'), Buffer.concat(encodeStage(ckpt(2, [[50, 100, 2]]))));
  const rep = await make().recover();
  t.same(rep.stage, { action: 'reapplied', epoch: 2 });
  const want = Buffer.alloc(IMAGE, 0xee);
  want.fill(1, 0, 100);
  want.fill(2, 50, 150);
  t.ok((await readFile(image)).equals(want));
  // Twice is the same as once.
  await writeFile(path.join(root, 'ckpt', 'stage.bin'), Buffer.concat(encodeStage(ckpt(2, [[50, 100, 2]]))));
  t.same((await make().recover()).stage, { action: 'discarded', reason: 'stale', epoch: 2 });
  t.ok((await readFile(image)).equals(want));
});

/** Checkpoint with extents `[offset, length, fill]`; fill -1: a zero extent. */
function zckpt(epoch: number, disk: [number, number, number][]): Checkpoint {
  return {
    ...ckpt(epoch, []),
    disk: disk.map(([offset, length, fill]) =>
      fill < 0 ? { offset, length, zero: true as const } : { offset, data: Buffer.alloc(length, fill) },
    ),
  };
}

const ZERO_CASE: [number, number, number][] = [
  [0, 16384, 1],
  [4096, 8192, -1], // TRIM / WRITE_ZEROES over the middle of the write
  [6000, 100, 3], // a later write inside the zeroed range
  [40960, 4096, -1], // zeroes over the image's initial bytes
  [IMAGE - 1000, 1000, -1], // unaligned, up to the end
];

function zeroCaseImage(): Buffer {
  const want = Buffer.alloc(IMAGE, 0xee);
  want.fill(1, 0, 16384);
  want.fill(0, 4096, 12288);
  want.fill(3, 6000, 6100);
  want.fill(0, 40960, 45056);
  want.fill(0, IMAGE - 1000);
  return want;
}

for (const fallocate of [true, false]) {
  t.test(`zero extents are applied in issue order and read back as zeroes (fallocate ${fallocate ? 'on' : 'off'})`, async (t) => {
    const { root, image } = await setup(t);
    const ramPath = path.join(root, 'ram');
    const disk = new ImageSink(image, { fallocate });
    t.teardown(() => disk.close());
    const store = new CheckpointStore({ dir: path.join(root, 'ckpt2'), ramPath, ramBytes: RAM, disk });
    await store.init0(Buffer.from('dev0'));
    await store.apply(zckpt(1, ZERO_CASE));
    t.ok((await readFile(image)).equals(zeroCaseImage()), 'image = initial + extents, zeroes where the last word was a zero extent');
    t.equal((await readFile(image)).length, IMAGE, 'size unchanged');
    if (fallocate) t.ok(disk.stats.zeroRange + disk.stats.punchHole === 3, 'by fallocate: no zero bytes written');
    else t.equal(disk.stats.zeroBytesWritten, 8192 + 4096 + 1000, 'fallback: zero bytes written');
  });
}

t.test('a zero extent past the end of the image fails the apply before anything is written', async (t) => {
  const { image, make } = await setup(t);
  const store = make();
  await store.init0(Buffer.from('dev0'));
  await t.rejects(
    store.apply(
      zckpt(1, [
        [0, 4096, 1],
        [IMAGE - 4096, 8192, -1],
      ]),
    ),
    { code: 'ERR_DISK_RANGE' },
  );
  t.ok((await readFile(image)).equals(Buffer.alloc(IMAGE, 0xee)), 'not even the first extent was written');
  t.equal(store.lastApplied().epoch, 0);
});

t.test('the stage file keeps zero extents: recovery re-applies them', async (t) => {
  const { root, image, make } = await setup(t);
  const first = make();
  await first.init0(Buffer.from('dev0'));
  const c = zckpt(1, ZERO_CASE);
  const stage = Buffer.concat(encodeStage(c));
  t.same(decodeStage(stage).disk, c.disk, 'stage round trip');
  await writeFile(path.join(root, 'ckpt', 'stage.bin'), stage);
  t.same((await make().recover()).stage, { action: 'reapplied', epoch: 1 });
  t.ok((await readFile(image)).equals(zeroCaseImage()));
});

/** Re-encodes a stage file with its disk table replaced (and its version): every CRC recomputed. */
function restage(file: Buffer, version: number, table: (t: Buffer) => Buffer): Buffer {
  const lengths: number[] = [];
  for (let i = 0; i < 6; i++) lengths.push(Number(file.readBigUInt64BE(24 + 12 * i)));
  const sections: Buffer[] = [];
  let off = 100;
  for (const l of lengths) {
    sections.push(file.subarray(off, off + l));
    off += l;
  }
  sections[3] = table(sections[3]!);
  const header = Buffer.from(file.subarray(0, 100));
  header.writeUInt16BE(version, 4);
  sections.forEach((s, i) => {
    header.writeBigUInt64BE(BigInt(s.length), 24 + 12 * i);
    header.writeUInt32BE(crc32(s), 24 + 12 * i + 8);
  });
  header.writeUInt32BE(crc32(header.subarray(0, 96)), 96);
  const body = Buffer.concat([header, ...sections]);
  const trailer = Buffer.alloc(4);
  trailer.writeUInt32BE(crc32(body), 0);
  return Buffer.concat([body, trailer]);
}

t.test('stage disk table: version 1 still read, bad zero entries refused', async (t) => {
  const data = ckpt(1, [
    [0, 100, 1],
    [500, 20, 2],
  ]);
  const v2 = Buffer.concat(encodeStage(data));
  // version 1: 16-byte entries { offset, length }, every extent data
  const v1 = restage(v2, 1, (tb) => Buffer.concat([tb.subarray(0, 16), tb.subarray(20, 36)]));
  t.same(decodeStage(v1).disk, data.disk, 'a version 1 stage (written before zero extents existed) decodes the same');

  const z = Buffer.concat(encodeStage(zckpt(1, [[4096, 4096, -1]])));
  const code = (b: Buffer) => {
    try {
      decodeStage(b);
      return 'decoded';
    } catch (e) {
      return (e as { code?: string }).code;
    }
  };
  const entry = (fn: (tb: Buffer) => void) =>
    restage(z, 2, (tb) => {
      const c = Buffer.from(tb);
      fn(c);
      return c;
    });
  t.equal(code(z), 'decoded');
  t.equal(code(entry((tb) => tb.writeUInt32BE(2, 16))), 'ERR_STAGE_MALFORMED', 'unknown kind');
  t.equal(code(entry((tb) => tb.writeBigUInt64BE(0n, 8))), 'ERR_STAGE_MALFORMED', 'zero extent of length 0');
  t.equal(code(entry((tb) => tb.writeBigUInt64BE(BigInt(2 ** 31), 8))), 'ERR_STAGE_MALFORMED', 'zero extent above the bound');
  t.equal(code(restage(z, 2, (tb) => tb.subarray(0, 16))), 'ERR_STAGE_MALFORMED', 'a 16-byte entry in a version 2 file');
});
