import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import type { Checkpoint } from '../checkpoint/assembler.ts';
import { encodeStage } from '../checkpoint/stage.ts';
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
