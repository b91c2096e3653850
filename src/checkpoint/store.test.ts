import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import t, { type Test } from 'tap';
import { TetherError } from '../errors.ts';
import { CheckpointAssembler, checkpointMessages, type Checkpoint } from './assembler.ts';
import { PAGE_SIZE } from './messages.ts';
import { decodeStage, encodeStage } from './stage.ts';
import { CheckpointStore, type DiskSink } from './store.ts';

const PAGES = 16;
const RAM_BYTES = PAGES * PAGE_SIZE;

function ckpt(epoch: number, pages: [pfn: number, fill: number | 'zero'][], disk: [number, string][] = []): Checkpoint {
  return {
    epoch,
    pfns: Uint32Array.from(pages.map((p) => p[0])),
    zeroMask: Uint8Array.from(pages.map((p) => (p[1] === 'zero' ? 1 : 0))),
    data: Buffer.concat(pages.filter((p) => p[1] !== 'zero').map((p) => Buffer.alloc(PAGE_SIZE, p[1] as number))),
    disk: disk.map(([offset, s]) => ({ offset, data: Buffer.from(s) })),
    devstate: Buffer.from(`device state ${epoch} `.repeat(10)),
  };
}

const C1 = ckpt(
  1,
  [
    [5, 0xaa],
    [3, 0xbb],
    [4, 'zero'],
    [15, 0xcc],
    [0, 0xdd],
  ],
  [[100, 'hello']],
);
const C2 = ckpt(
  2,
  [
    [4, 0x44],
    [6, 'zero'],
    [3, 0x33],
  ],
  [
    [100, 'HE'],
    [4096, 'world'],
  ],
);
const C3 = ckpt(3, [
  [7, 0x77],
  [0, 'zero'],
  [8, 0x88],
  [9, 0x99],
]);

/** Expected RAM image: starts as 0x01 everywhere, checkpoints applied in order. */
function expectedRam(...cs: Checkpoint[]): Buffer {
  const ram = Buffer.alloc(RAM_BYTES, 0x01);
  for (const c of cs) {
    let k = 0;
    c.pfns.forEach((pfn, i) => {
      const src = c.zeroMask[i] ? Buffer.alloc(PAGE_SIZE) : c.data.subarray(k++ * PAGE_SIZE, k * PAGE_SIZE);
      src.copy(ram, pfn * PAGE_SIZE);
    });
  }
  return ram;
}

class MemoryDisk implements DiskSink {
  writes: [number, string][] = [];
  flushes = 0;
  failNext = false;
  async check(): Promise<void> {}
  async pwrite(offset: number, data: Buffer): Promise<void> {
    if (this.failNext) {
      this.failNext = false;
      throw Object.assign(new Error('EIO: simulated'), { code: 'EIO' });
    }
    this.writes.push([offset, data.toString()]);
  }
  async zero(offset: number, length: number): Promise<void> {
    this.writes.push([offset, `zero:${length}`]);
  }
  async flush(): Promise<void> {
    this.flushes++;
  }
}

async function setup(t: Test, disk?: DiskSink) {
  const root = await mkdtemp(path.join(os.tmpdir(), 'tether-store-'));
  t.teardown(() => rm(root, { recursive: true, force: true }));
  const dir = path.join(root, 'vm', 'checkpoints');
  const ramPath = path.join(root, 'ram');
  await writeFile(ramPath, Buffer.alloc(RAM_BYTES, 0x01));
  const make = () => new CheckpointStore({ dir, ramPath, ramBytes: RAM_BYTES, ...(disk ? { disk } : {}) });
  /** Everything on disk, hashed: RAM file plus each state file. */
  const snapshot = async () => {
    const files: Record<string, string> = {};
    for (const name of (await readdir(dir)).sort()) {
      files[name] = createHash('sha256')
        .update(await readFile(path.join(dir, name)))
        .digest('hex');
    }
    return {
      ram: createHash('sha256')
        .update(await readFile(ramPath))
        .digest('hex'),
      files,
    };
  };
  return { dir, ramPath, make, snapshot };
}

async function code(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
  } catch (e) {
    if (e instanceof TetherError) return e.code;
    throw e;
  }
  return undefined;
}

t.test('init0 and two checkpoints', async (t) => {
  const disk = new MemoryDisk();
  const { dir, ramPath, make } = await setup(t, disk);
  const store = make();
  t.equal(await code(store.apply(C1)), 'ERR_CKPT_NOT_INITIALIZED');
  await store.init0(Buffer.from('devstate zero'));
  t.same(store.lastApplied(), { epoch: 0, devstatePath: path.join(dir, 'devstate-0.bin') });
  t.equal((await readFile(store.lastApplied().devstatePath)).toString(), 'devstate zero');

  await store.apply(C1);
  t.ok((await readFile(ramPath)).equals(expectedRam(C1)), 'RAM after checkpoint 1');
  await store.apply(C2);
  t.ok((await readFile(ramPath)).equals(expectedRam(C1, C2)), 'RAM after checkpoint 2');

  const last = store.lastApplied();
  t.same(last, { epoch: 2, devstatePath: path.join(dir, 'devstate-2.bin') });
  t.ok((await readFile(last.devstatePath)).equals(C2.devstate));
  t.same((await readdir(dir)).sort(), ['applied.json', 'devstate-2.bin', 'reserve.bin'], 'no stage, no old device state');
  const record = JSON.parse(await readFile(path.join(dir, 'applied.json'), 'utf8'));
  t.match(record, { epoch: 2, devstate: 'devstate-2.bin', devstateBytes: C2.devstate.length, crc32: Number });
  t.same(
    disk.writes,
    [
      [100, 'hello'],
      [100, 'HE'],
      [4096, 'world'],
    ],
    'disk extents in order',
  );
  t.equal(disk.flushes, 2);

  // A fresh store (restart) sees the same state.
  const again = await make().recover();
  t.same(again, { epoch: 2, devstatePath: last.devstatePath, stage: { action: 'none' } });
});

t.test('apply refuses anything but applied+1 and invalid checkpoints, changing nothing', async (t) => {
  const { make, snapshot } = await setup(t);
  const store = make();
  await store.init0(Buffer.from('d0'));
  await store.apply(C1);
  const before = await snapshot();
  t.equal(await code(store.apply(C1)), 'ERR_CKPT_EPOCH', 'same epoch again');
  t.equal(await code(store.apply(C3)), 'ERR_CKPT_EPOCH', 'skips an epoch');
  t.equal(await code(store.apply(ckpt(2, [[PAGES, 1]]))), 'ERR_CKPT_PFN_RANGE');
  t.equal(
    await code(
      store.apply(
        ckpt(2, [
          [2, 1],
          [2, 2],
        ]),
      ),
    ),
    'ERR_CKPT_DUPLICATE_PAGE',
  );
  t.equal(await code(store.apply({ ...C2, data: C2.data.subarray(1) })), 'ERR_CKPT_INVALID');
  t.same(await snapshot(), before);
  t.equal(store.lastApplied().epoch, 1);
  await store.apply(C2);
  t.equal(store.lastApplied().epoch, 2, 'still usable');
});

t.test('a checkpoint whose assembly failed changes nothing', async (t) => {
  const { make, snapshot, ramPath } = await setup(t);
  const store = make();
  await store.init0(Buffer.from('d0'));
  await store.apply(C1);
  const before = await snapshot();
  const a = new CheckpointAssembler({ ramPages: PAGES, maxCheckpointBytes: 1 << 24, expectEpoch: 2 });
  const msgs = checkpointMessages(C2);
  const commit = msgs.at(-1)!;
  if (commit.type !== 'commit') throw new Error('last message is COMMIT');
  let applied = false;
  try {
    for (const m of [...msgs.slice(0, -1), { ...commit, digest: Buffer.alloc(32) }]) {
      const c = a.accept(m);
      if (c) {
        await store.apply(c);
        applied = true;
      }
    }
    t.fail('assembly must fail');
  } catch (e) {
    t.equal((e as TetherError).code, 'ERR_CKPT_DIGEST');
  }
  t.notOk(applied);
  t.same(await snapshot(), before);
  t.ok((await readFile(ramPath)).equals(expectedRam(C1)));
});

t.test('crash after the stage was persisted: recover re-applies it', async (t) => {
  const disk = new MemoryDisk();
  const { dir, ramPath, make } = await setup(t, disk);
  const first = make();
  await first.init0(Buffer.from('d0'));
  await first.apply(C1);
  // The crashed apply of C2 persisted its stage and wrote some pages, nothing else.
  await writeFile(path.join(dir, 'stage.bin'), Buffer.concat(encodeStage(C2)));
  const ram = await readFile(ramPath);
  Buffer.alloc(PAGE_SIZE, 0x44).copy(ram, 4 * PAGE_SIZE);
  await writeFile(ramPath, ram);
  await writeFile(path.join(dir, 'applied.json.tmp'), 'half a record');

  const store = make();
  t.same(await store.recover(), {
    epoch: 2,
    devstatePath: path.join(dir, 'devstate-2.bin'),
    stage: { action: 'reapplied', epoch: 2 },
  });
  t.ok((await readFile(ramPath)).equals(expectedRam(C1, C2)));
  t.ok((await readFile(path.join(dir, 'devstate-2.bin'))).equals(C2.devstate));
  t.same((await readdir(dir)).sort(), ['applied.json', 'devstate-2.bin', 'reserve.bin']);
  t.same(disk.writes.slice(-2), [
    [100, 'HE'],
    [4096, 'world'],
  ]);

  // Recover is idempotent, and the store goes on.
  t.same((await make().recover()).stage, { action: 'none' });
  await store.apply(C3);
  t.ok((await readFile(ramPath)).equals(expectedRam(C1, C2, C3)));
});

t.test('crash after the applied record, before the stage was removed: stage is stale', async (t) => {
  const { dir, ramPath, make } = await setup(t);
  const first = make();
  await first.init0(Buffer.from('d0'));
  await first.apply(C1);
  await first.apply(C2);
  await writeFile(path.join(dir, 'stage.bin'), Buffer.concat(encodeStage(C2)));
  const r = await make().recover();
  t.same(r.stage, { action: 'discarded', reason: 'stale', epoch: 2 });
  t.equal(r.epoch, 2);
  t.ok((await readFile(ramPath)).equals(expectedRam(C1, C2)));

  await writeFile(path.join(dir, 'stage.bin'), Buffer.concat(encodeStage(ckpt(5, [[1, 1]]))));
  t.same((await make().recover()).stage, { action: 'discarded', reason: 'epoch-gap', epoch: 5 });
});

t.test('truncated or corrupted stage on recover is discarded; previous checkpoint intact', async (t) => {
  const { dir, make, snapshot } = await setup(t);
  const first = make();
  await first.init0(Buffer.from('d0'));
  await first.apply(C1);
  const intact = await snapshot();
  const stage = Buffer.concat(encodeStage(C2));
  const variants: [string, Buffer, string][] = [
    ['empty', Buffer.alloc(0), 'ERR_STAGE_TRUNCATED'],
    ['header only', stage.subarray(0, 100), 'ERR_STAGE_TRUNCATED'],
    ['half', stage.subarray(0, stage.length >> 1), 'ERR_STAGE_TRUNCATED'],
    ['last byte missing', stage.subarray(0, -1), 'ERR_STAGE_TRUNCATED'],
    ['flipped page byte', flip(stage, 100 + 4 * 3 + 3 + 10), 'ERR_STAGE_BAD_CRC'],
    ['flipped header byte', flip(stage, 12), 'ERR_STAGE_BAD_CRC'],
    ['flipped trailer', flip(stage, stage.length - 1), 'ERR_STAGE_BAD_CRC'],
    ['bad magic', flip(stage, 0), 'ERR_STAGE_BAD_MAGIC'],
  ];
  for (const [name, bytes, want] of variants) {
    await writeFile(path.join(dir, 'stage.bin'), bytes);
    const r = await make().recover();
    t.same(r.stage, { action: 'discarded', reason: 'corrupt', code: want }, name);
    t.equal(r.epoch, 1);
    t.same(await snapshot(), intact, `${name}: state as before`);
  }
  // A stage naming a pfn beyond this guest's RAM is discarded too.
  await writeFile(path.join(dir, 'stage.bin'), Buffer.concat(encodeStage(ckpt(2, [[PAGES + 1, 1]]))));
  t.same((await make().recover()).stage, { action: 'discarded', reason: 'invalid', code: 'ERR_CKPT_PFN_RANGE' });
  t.same(await snapshot(), intact);
});

t.test('failure after the stage was persisted: store refuses until recover', async (t) => {
  const disk = new MemoryDisk();
  const { ramPath, make } = await setup(t, disk);
  const store = make();
  await store.init0(Buffer.from('d0'));
  await store.apply(C1);
  disk.failNext = true;
  t.equal(await code(store.apply(C2)), 'ERR_CKPT_IO');
  // C2's pages are in the RAM file already: checkpoint 1's device state over it would be mixed state
  t.throws(() => store.lastApplied(), { code: 'ERR_CKPT_STORE_BROKEN' }, 'no restore point while half applied');
  t.equal(await code(store.apply(C2)), 'ERR_CKPT_STORE_BROKEN');
  t.same((await store.repair())?.stage, { action: 'reapplied', epoch: 2 });
  t.equal(store.lastApplied().epoch, 2, 'whole again');
  t.ok((await readFile(ramPath)).equals(expectedRam(C1, C2)));
  await store.apply(C3);
  t.equal(store.lastApplied().epoch, 3);
});

t.test('damaged durable state is reported, not guessed around', async (t) => {
  const { dir, make } = await setup(t);
  t.equal(await code(make().recover()), 'ERR_CKPT_NOT_INITIALIZED');
  t.throws(() => make().lastApplied(), { code: 'ERR_CKPT_NOT_INITIALIZED' });
  const store = make();
  await store.init0(Buffer.from('d0'));
  await store.apply(C1);
  const record = await readFile(path.join(dir, 'applied.json'), 'utf8');
  await writeFile(path.join(dir, 'applied.json'), record.replace('"epoch":1', '"epoch":2'));
  t.equal(await code(make().recover()), 'ERR_CKPT_APPLIED_CORRUPT');
  await writeFile(path.join(dir, 'applied.json'), record);
  await writeFile(path.join(dir, 'devstate-1.bin'), 'truncated');
  t.equal(await code(make().recover()), 'ERR_CKPT_DEVSTATE_CORRUPT');
});

t.test('concurrent applies are serialised', async (t) => {
  const { ramPath, make } = await setup(t);
  const store = make();
  await store.init0(Buffer.from('d0'));
  await Promise.all([store.apply(C1), store.apply(C2), store.apply(C3)]);
  t.equal(store.lastApplied().epoch, 3);
  t.ok((await readFile(ramPath)).equals(expectedRam(C1, C2, C3)));
});

t.test('RAM file must be as large as guest RAM', async (t) => {
  const { ramPath, make } = await setup(t);
  await writeFile(ramPath, Buffer.alloc(PAGE_SIZE));
  t.equal(await code(make().init0(Buffer.from('d0'))), 'ERR_CKPT_RAM_FILE');
});

function flip(b: Buffer, i: number): Buffer {
  const c = Buffer.from(b);
  c[i]! ^= 0x5a;
  return c;
}

t.test('stage codec: round-trip, every corrupted byte detected, garbage only TetherError', async (t) => {
  const plain = (c: Checkpoint) =>
    JSON.stringify([
      c.epoch,
      [...c.pfns],
      [...c.zeroMask],
      c.data.toString('hex'),
      c.disk.map((d) => (d.zero ? [d.offset, d.length, 'zero'] : [d.offset, d.data.toString('hex')])),
      c.devstate.toString('hex'),
    ]);
  for (const c of [C1, C2, C3, ckpt(9, [])]) t.equal(plain(decodeStage(Buffer.concat(encodeStage(c)))), plain(c));

  const small = Buffer.concat(
    encodeStage(
      ckpt(
        1,
        [
          [2, 'zero'],
          [3, 'zero'],
        ],
        [[7, 'ab']],
      ),
    ),
  );
  const codes = new Set<string>();
  for (let i = 0; i < small.length; i++) {
    try {
      decodeStage(flip(small, i));
      t.fail(`byte ${i} accepted`);
    } catch (e) {
      if (!(e instanceof TetherError)) throw e;
      codes.add(e.code);
    }
  }
  t.ok(codes.has('ERR_STAGE_BAD_CRC') && codes.has('ERR_STAGE_BAD_MAGIC'), [...codes].join(', '));

  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), fc.boolean(), (bytes, withMagic) => {
      const b = Buffer.from(bytes);
      if (withMagic && b.length >= 4) b.write('TTSG', 0, 'latin1');
      try {
        decodeStage(b);
      } catch (e) {
        if (!(e instanceof TetherError)) throw e;
      }
    }),
    { numRuns: 2000 },
  );
});

const enospcOpts = process.getuid?.() === 0 ? {} : { skip: 'needs root to mount a small tmpfs' };
t.test('ENOSPC in the middle of writing pages: no restore point until the stage is finished', enospcOpts, async (t) => {
  const root = await mkdtemp(path.join(os.tmpdir(), 'tether-store-enospc-'));
  const mnt = path.join(root, 'ram');
  await mkdir(mnt);
  // 32 KiB of tmpfs (8 pages): the guest RAM file is sparse, so each page written allocates one.
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=32k', 'tmpfs', mnt]);
  t.teardown(async () => {
    execFileSync('umount', ['-l', mnt]);
    await rm(root, { recursive: true, force: true });
  });
  const ramPath = path.join(mnt, 'ram');
  await writeFile(ramPath, '');
  await truncate(ramPath, RAM_BYTES);
  const filler = path.join(mnt, 'filler');
  // leave room for 2 of C1's 5 pages
  await writeFile(filler, Buffer.alloc(6 * PAGE_SIZE, 1));
  const store = new CheckpointStore({ dir: path.join(root, 'ckpt'), ramPath, ramBytes: RAM_BYTES });
  await store.init0(Buffer.from('d0'));
  const err = await store.apply(C1).then(
    () => null,
    (e: TetherError) => e,
  );
  t.equal(err?.code, 'ERR_CKPT_IO', 'apply fails');
  t.equal(err?.details?.errno, 'ENOSPC', 'with ENOSPC');
  const ram = await readFile(ramPath);
  t.ok(ram.subarray(0, PAGE_SIZE).equals(Buffer.alloc(PAGE_SIZE, 0xdd)), 'some pages of checkpoint 1 were written');
  t.throws(() => store.lastApplied(), { code: 'ERR_CKPT_STORE_BROKEN' }, 'checkpoint 0 is no restore point now');
  t.equal(await code(store.repair(2, 1)), 'ERR_CKPT_HALF_APPLIED', 'repair that cannot finish fails loudly');
  t.throws(() => store.lastApplied(), { code: 'ERR_CKPT_STORE_BROKEN' }, 'still no restore point');
  await rm(filler);
  t.same((await store.repair())?.stage, { action: 'reapplied', epoch: 1 }, 'space freed: the stage is finished');
  t.same(store.lastApplied().epoch, 1);
  const want = Buffer.alloc(RAM_BYTES);
  let k = 0;
  C1.pfns.forEach((pfn, i) => {
    if (!C1.zeroMask[i]) C1.data.subarray(k++ * PAGE_SIZE, k * PAGE_SIZE).copy(want, pfn * PAGE_SIZE);
  });
  t.ok((await readFile(ramPath)).equals(want), 'RAM holds checkpoint 1 whole');
});

t.test('completion record: only at the applied epoch, durable, final', async (t) => {
  const { dir, make } = await setup(t);
  const store = make();
  await store.init0(Buffer.from('d0'));
  await store.apply(C1);
  await store.apply(C2);
  t.equal(await code(store.recordCompleted(1)), 'ERR_COMPLETE_EPOCH', 'an older epoch than the applied one is refused');
  t.equal(await code(store.recordCompleted(3)), 'ERR_COMPLETE_EPOCH', 'an epoch never applied is refused');
  t.equal(await CheckpointStore.readCompleted(dir), null, 'nothing recorded by a refusal');
  await store.recordCompleted(2);
  t.equal(await CheckpointStore.readCompleted(dir), 2);
  t.equal(await code(store.apply(C3)), 'ERR_CKPT_COMPLETED', 'nothing is applied after completion');
  const again = make();
  await again.recover();
  t.equal(await code(again.apply(C3)), 'ERR_CKPT_COMPLETED', 'also after a restart');
  const file = path.join(dir, 'completed.json');
  const text = await readFile(file, 'utf8');
  await writeFile(file, text.replace('"epoch":2', '"epoch":3'));
  t.equal(await code(CheckpointStore.readCompleted(dir)), 'ERR_CKPT_COMPLETED_CORRUPT', 'a damaged record is an error');
  await writeFile(file, text.slice(0, 10));
  t.equal(await code(CheckpointStore.readCompleted(dir)), 'ERR_CKPT_COMPLETED_CORRUPT');
  await make().init0(Buffer.from('d0'));
  t.equal(await CheckpointStore.readCompleted(dir), null, 'a new migration starts without it');
});

t.test('the failPages hook: a page-write failure once is repaired, sticky is not', async (t) => {
  for (const sticky of [false, true]) {
    const { ramPath, dir } = await setup(t);
    const store = new CheckpointStore({ dir, ramPath, ramBytes: RAM_BYTES, failPages: { epoch: 2, sticky } });
    await store.init0(Buffer.from('d0'));
    await store.apply(C1);
    const err = await store.apply(C2).then(
      () => null,
      (e: unknown) => e,
    );
    // (the message names the checkpoint: netns-tests/half-applied.test.ts reads it)
    t.match(
      err,
      { code: 'ERR_CKPT_IO', message: /^applying checkpoint 2: EIO/, details: { errno: 'EIO' } },
      `sticky=${sticky}: apply fails`,
    );
    t.throws(() => store.lastApplied(), { code: 'ERR_CKPT_STORE_BROKEN' });
    if (sticky) {
      t.equal(await code(store.repair(2, 1)), 'ERR_CKPT_HALF_APPLIED', 'cannot be finished');
    } else {
      t.same((await store.repair())?.stage, { action: 'reapplied', epoch: 2 });
      t.ok((await readFile(ramPath)).equals(expectedRam(C1, C2)), 'RAM holds checkpoint 2 whole');
    }
  }
});

t.test('a full tmpfs never half-applies, and the give-up record still lands (reserve)', enospcOpts, async (t) => {
  const root = await mkdtemp(path.join(os.tmpdir(), 'tether-store-full-'));
  const mnt = path.join(root, 'ram');
  await mkdir(mnt);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=512k', 'tmpfs', mnt]);
  t.teardown(async () => {
    execFileSync('umount', ['-l', mnt]);
    await rm(root, { recursive: true, force: true });
  });
  // the source's layout: RAM file and checkpoint directory on one tmpfs, the RAM file
  // fallocated before the migration (source.ts), so page writes need no new room
  const ramPath = path.join(mnt, 'vm.ram');
  await writeFile(ramPath, '');
  execFileSync('fallocate', ['-l', String(RAM_BYTES), ramPath]);
  const dir = path.join(mnt, 'vm.ckpt');
  const store = new CheckpointStore({ dir, ramPath, ramBytes: RAM_BYTES });
  await store.init0(Buffer.from('d0'));
  t.ok((await readdir(dir)).includes('reserve.bin'), 'init0 keeps a reserve');
  // another tenant of the tmpfs takes every page left
  const filler = path.join(mnt, 'filler');
  await writeFile(filler, '');
  for (;;) {
    try {
      await writeFile(filler, Buffer.alloc(PAGE_SIZE, 7), { flag: 'a' });
    } catch {
      break;
    }
  }
  const ramBefore = await readFile(ramPath);
  t.equal(await code(store.apply(C1)), 'ERR_CKPT_IO', 'apply of checkpoint 1 fails on the full tmpfs');
  t.ok((await readFile(ramPath)).equals(ramBefore), 'before any page was written');
  t.equal(store.lastApplied().epoch, 0, 'checkpoint 0 stays a whole restore point (the store is not broken)');
  t.equal((await store.verifyApplied()).epoch, 0, 'and verifies from disk');
  t.equal(await store.recordGaveUp(), 0, 'the give-up record is written with the reserve');
  t.equal(await CheckpointStore.readCompleted(dir), 0, 'durably');
});

t.test('verifyApplied checks the device state on disk; recordGaveUp works on a broken store', async (t) => {
  const { ramPath, dir } = await setup(t);
  const store = new CheckpointStore({ dir, ramPath, ramBytes: RAM_BYTES, failPages: { epoch: 2, sticky: true } });
  await store.init0(Buffer.from('d0'));
  await store.apply(C1);
  t.equal((await store.verifyApplied()).epoch, 1);
  await writeFile(path.join(dir, 'devstate-1.bin'), 'damaged');
  t.equal(await code(store.verifyApplied()), 'ERR_CKPT_DEVSTATE_CORRUPT', 'a damaged device-state file is no restore point');
  t.equal(await code(store.apply(C2)), 'ERR_CKPT_IO');
  t.equal(await code(store.verifyApplied()), 'ERR_CKPT_STORE_BROKEN', 'a half-applied store is none either');
  t.equal(await store.recordGaveUp(), 1, 'giving up is recorded at the applied epoch');
  t.equal(await CheckpointStore.readCompleted(dir), 1);
  t.equal(await code(store.apply(C2)), 'ERR_CKPT_STORE_BROKEN');
});
