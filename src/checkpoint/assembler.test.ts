import t from 'tap';
import { TetherError } from '../errors.ts';
import { CheckpointAssembler, checkpointMessages, type Checkpoint } from './assembler.ts';
import { Encoder } from '../peer/codec.ts';
import { Decoder } from '../peer/decoder.ts';
import type { Message } from '../peer/messages.ts';
import { MAX_DISK_ZERO_BYTES, PAGE_SIZE, type CheckpointMessage } from './messages.ts';

const RAM_PAGES = 64;

function ckpt(epoch: number, pfns: number[] = [3, 1, 40, 7, 8], zeroAt: number[] = [1]): Checkpoint {
  const zeroMask = Uint8Array.from(pfns.map((_, i) => (zeroAt.includes(i) ? 1 : 0)));
  const data = Buffer.concat(pfns.filter((_, i) => !zeroAt.includes(i)).map((pfn) => Buffer.alloc(PAGE_SIZE, pfn + epoch)));
  return {
    epoch,
    pfns: Uint32Array.from(pfns),
    zeroMask,
    data,
    disk: [
      { offset: 512, data: Buffer.from('first write') },
      { offset: 1 << 20, data: Buffer.from('second') },
    ],
    devstate: Buffer.from(`devstate of ${epoch}`),
  };
}

function asm(expectEpoch = 1, maxCheckpointBytes = 1 << 24): CheckpointAssembler {
  return new CheckpointAssembler({ ramPages: RAM_PAGES, maxCheckpointBytes, expectEpoch });
}

/** Feeds messages; returns the checkpoint or the error code of the first failure. */
function feed(a: CheckpointAssembler, msgs: Message[]): Checkpoint | string | null {
  let out: Checkpoint | null = null;
  for (const m of msgs) {
    try {
      out = a.accept(m);
    } catch (e) {
      if (e instanceof TetherError) return e.code;
      throw e;
    }
  }
  return out;
}

function plain(c: Checkpoint): unknown {
  return {
    epoch: c.epoch,
    pfns: [...c.pfns],
    zeroMask: [...c.zeroMask],
    data: c.data.toString('hex'),
    disk: c.disk.map((d) => (d.zero ? [d.offset, d.length, 'zero'] : [d.offset, d.data.toString('hex')])),
    devstate: c.devstate.toString('hex'),
  };
}

t.test('assembles a checkpoint split over several PAGES messages', async (t) => {
  const a = asm();
  const c1 = ckpt(1);
  const msgs = checkpointMessages(c1, { maxPagesPerMessage: 2 });
  t.equal(msgs.filter((m) => m.type === 'pages').length, 3);
  const results = msgs.map((m) => a.accept(m));
  t.same(results.slice(0, -1), Array(msgs.length - 1).fill(null), 'null until COMMIT');
  t.same(plain(results.at(-1)!), plain(c1));
  t.equal(a.expectEpoch, 2);
  t.equal(a.openEpoch, null);

  // The same transaction through the wire: the digest covers the decoded payloads.
  const c2 = ckpt(2, [5, 6, 7], [0, 2]);
  const enc = new Encoder({ key: Buffer.alloc(32, 1) });
  const wire = Buffer.concat(checkpointMessages(c2, { maxPagesPerMessage: 1 }).flatMap((m) => enc.encode(m)));
  const decoded = new Decoder({ maxPayload: 1 << 20, key: Buffer.alloc(32, 1) }).push(wire);
  t.same(plain(feed(a, decoded) as Checkpoint), plain(c2));

  // No pages and no disk writes is a valid checkpoint.
  const empty: Checkpoint = { ...ckpt(3, [], []), disk: [] };
  t.same(plain(feed(a, checkpointMessages(empty)) as Checkpoint), plain(empty));
});

t.test('error codes', async (t) => {
  const c = ckpt(1);
  const good = checkpointMessages(c, { maxPagesPerMessage: 2 });
  const [begin, p1, p2, p3, d1, d2, dev, commit] = good as [
    CheckpointMessage,
    CheckpointMessage,
    CheckpointMessage,
    CheckpointMessage,
    CheckpointMessage,
    CheckpointMessage,
    CheckpointMessage,
    CheckpointMessage & { type: 'commit' },
  ];
  const cases: [string, Message[], string][] = [
    ['BEGIN of a later epoch', [{ type: 'begin', epoch: 2 }], 'ERR_CKPT_EPOCH'],
    ['BEGIN of an old epoch', [{ type: 'begin', epoch: 0 }], 'ERR_CKPT_EPOCH'],
    ['PAGES of another epoch', [begin, { ...p1, epoch: 2 } as Message], 'ERR_CKPT_EPOCH'],
    ['COMMIT of another epoch', [begin, p1, p2, p3, d1, d2, dev, { ...commit, epoch: 2 }], 'ERR_CKPT_EPOCH'],
    ['PAGES outside a transaction', [p1], 'ERR_CKPT_SEQUENCE'],
    ['COMMIT outside a transaction', [commit], 'ERR_CKPT_SEQUENCE'],
    ['BEGIN inside a transaction', [begin, p1, begin], 'ERR_CKPT_SEQUENCE'],
    ['PAGES after DISK', [begin, p1, d1, p2], 'ERR_CKPT_SEQUENCE'],
    ['DISK after DEVSTATE', [begin, p1, p2, p3, dev, d1], 'ERR_CKPT_SEQUENCE'],
    ['second DEVSTATE', [begin, dev, dev], 'ERR_CKPT_SEQUENCE'],
    ['non-checkpoint message', [begin, { type: 'ack', epoch: 1 }], 'ERR_CKPT_SEQUENCE'],
    [
      'pfn beyond guest RAM',
      [begin, { type: 'pages', epoch: 1, pfns: Uint32Array.from([RAM_PAGES]), zero: Uint8Array.from([1]), data: Buffer.alloc(0) }],
      'ERR_CKPT_PFN_RANGE',
    ],
    [
      'duplicate pfn in one message',
      [begin, { type: 'pages', epoch: 1, pfns: Uint32Array.from([9, 9]), zero: Uint8Array.from([1, 1]), data: Buffer.alloc(0) }],
      'ERR_CKPT_DUPLICATE_PAGE',
    ],
    ['duplicate pfn across messages', [begin, p1, p2, p1], 'ERR_CKPT_DUPLICATE_PAGE'],
    ['COMMIT without DEVSTATE', [begin, p1, p2, p3, d1, d2, commit], 'ERR_CKPT_INCOMPLETE'],
    ['missing PAGES message', [begin, p1, p3, d1, d2, dev, commit], 'ERR_CKPT_TOTALS'],
    ['pages total', [begin, p1, p2, p3, d1, d2, dev, { ...commit, pages: commit.pages + 1 }], 'ERR_CKPT_TOTALS'],
    ['disk total', [begin, p1, p2, p3, d1, dev, commit], 'ERR_CKPT_TOTALS'],
    ['devstate total', [begin, p1, p2, p3, d1, d2, dev, { ...commit, devstateBytes: 0 }], 'ERR_CKPT_TOTALS'],
    ['digest byte', [begin, p1, p2, p3, d1, d2, dev, { ...commit, digest: Buffer.alloc(32) }], 'ERR_CKPT_DIGEST'],
    ['reordered DISK', [begin, p1, p2, p3, d2, d1, dev, commit], 'ERR_CKPT_DIGEST'],
    ['reordered PAGES', [begin, p2, p1, p3, d1, d2, dev, commit], 'ERR_CKPT_DIGEST'],
    [
      'altered page data',
      [begin, p1, { ...p2, data: Buffer.alloc((p2 as { data: Buffer }).data.length, 0xee) } as Message, p3, d1, d2, dev, commit],
      'ERR_CKPT_DIGEST',
    ],
  ];
  for (const [name, msgs, want] of cases) {
    const a = asm();
    t.equal(feed(a, msgs), want, name);
    // The partial transaction is gone: the correct checkpoint for the expected epoch still
    // assembles, including pfns the failed attempt had already marked.
    t.equal(a.openEpoch, null, `${name}: discarded`);
    t.equal(a.expectEpoch, 1);
    t.same(plain(feed(a, good) as Checkpoint), plain(c), `${name}: retry assembles`);
  }

  const small = asm(1, 3 * PAGE_SIZE);
  t.equal(feed(small, good), 'ERR_CKPT_TOO_LARGE', 'size budget');
  t.equal(small.openEpoch, null);
});

t.test('options are checked', async (t) => {
  for (const o of [
    { ramPages: 0, maxCheckpointBytes: 1, expectEpoch: 1 },
    { ramPages: 1, maxCheckpointBytes: -1, expectEpoch: 1 },
    { ramPages: 1, maxCheckpointBytes: 1, expectEpoch: 0 },
  ]) {
    t.throws(() => new CheckpointAssembler(o), { code: 'ERR_CKPT_INVALID_OPTION' });
  }
});

t.test('zero extents travel as DISKZERO (no payload) and come back as zero extents, in issue order', async (t) => {
  const c: Checkpoint = {
    ...ckpt(1),
    disk: [
      { offset: 0, data: Buffer.from('before') },
      { offset: 4096, length: 8192, zero: true },
      { offset: 5000, data: Buffer.from('after the zeroes') },
      // longer than one DISKZERO may carry: split
      { offset: 1 << 30, length: 2 * MAX_DISK_ZERO_BYTES + 4096, zero: true },
    ],
  };
  const msgs = checkpointMessages(c);
  const zeros = msgs.filter((m) => m.type === 'diskzero');
  t.same(
    zeros.map((m) => [m.offset, m.length]),
    [
      [4096, 8192],
      [1 << 30, MAX_DISK_ZERO_BYTES],
      [(1 << 30) + MAX_DISK_ZERO_BYTES, MAX_DISK_ZERO_BYTES],
      [(1 << 30) + 2 * MAX_DISK_ZERO_BYTES, 4096],
    ],
    'the 2 GiB + 4 KiB extent is three DISKZERO messages',
  );
  const commit = msgs.at(-1) as CheckpointMessage & { type: 'commit' };
  t.equal(commit.diskBytes, 6 + 16, 'COMMIT.diskBytes counts DISK data only');
  // through the wire (MAC'd frames): what crosses the link for the zeroes is 24 bytes each
  const enc = new Encoder({ key: Buffer.alloc(32, 1) });
  const frames = msgs.map((m) => Buffer.concat(enc.encode(m)));
  const zeroFrameBytes = frames.filter((_, i) => msgs[i]!.type === 'diskzero').reduce((s, f) => s + f.length, 0);
  t.equal(zeroFrameBytes, 4 * (16 + 24 + 32), '2 GiB of zeroes cost 4 frames of 72 bytes');
  const decoded = new Decoder({ maxPayload: 1 << 20, key: Buffer.alloc(32, 1) }).push(Buffer.concat(frames));
  const got = feed(asm(), decoded) as Checkpoint;
  t.same(
    got.disk.map((d) => (d.zero ? ['zero', d.offset, d.length] : ['data', d.offset, d.data.toString()])),
    [
      ['data', 0, 'before'],
      ['zero', 4096, 8192],
      ['data', 5000, 'after the zeroes'],
      ['zero', 1 << 30, MAX_DISK_ZERO_BYTES],
      ['zero', (1 << 30) + MAX_DISK_ZERO_BYTES, MAX_DISK_ZERO_BYTES],
      ['zero', (1 << 30) + 2 * MAX_DISK_ZERO_BYTES, 4096],
    ],
  );
});

t.test('DISKZERO: sequence, digest and budget errors discard the whole checkpoint', async (t) => {
  const c: Checkpoint = { ...ckpt(1, [2], []), disk: [{ offset: 8192, length: 4096, zero: true }] };
  const good = checkpointMessages(c);
  const [begin, p1, z, dev, commit] = good as [
    CheckpointMessage,
    CheckpointMessage,
    CheckpointMessage & { type: 'diskzero' },
    CheckpointMessage,
    CheckpointMessage,
  ];
  const cases: [string, Message[], string][] = [
    ['DISKZERO after DEVSTATE', [begin, p1, dev, z, commit], 'ERR_CKPT_SEQUENCE'],
    ['DISKZERO outside a transaction', [z], 'ERR_CKPT_SEQUENCE'],
    ['DISKZERO of another epoch', [begin, p1, { ...z, epoch: 2 }], 'ERR_CKPT_EPOCH'],
    ['DISKZERO missing', [begin, p1, dev, commit], 'ERR_CKPT_DIGEST'],
    ['DISKZERO length altered', [begin, p1, { ...z, length: 8192 }, dev, commit], 'ERR_CKPT_DIGEST'],
    ['DISKZERO offset altered', [begin, p1, { ...z, offset: 0 }, dev, commit], 'ERR_CKPT_DIGEST'],
    ['DISKZERO twice', [begin, p1, z, z, dev, commit], 'ERR_CKPT_DIGEST'],
  ];
  for (const [name, msgs, want] of cases) {
    const a = asm();
    t.equal(feed(a, msgs), want, name);
    t.equal(a.openEpoch, null, `${name}: nothing of it kept`);
    t.same(plain(feed(a, good) as Checkpoint), plain(c), `${name}: the correct one still assembles`);
  }
  // the budget counts the 24 payload bytes, not the zeroes' length
  const tight = asm(1, PAGE_SIZE + 8 + 4 + 4 + 1 + 24 + 8 + c.devstate.length);
  t.same(plain(feed(tight, good) as Checkpoint), plain(c), 'a 4 KiB zero extent costs 24 bytes of the budget');
  const short = asm(1, PAGE_SIZE + 8 + 4 + 4 + 1 + 24 + 8 + c.devstate.length - 1);
  t.equal(feed(short, good), 'ERR_CKPT_TOO_LARGE', 'one byte less does not fit');
});
