import t from 'tap';
import { isTetherError } from '../errors.ts';
import {
  decodePagemapEntry,
  encodePagemapEntry,
  findRamSegments,
  pagemapCandidates,
  parseMaps,
  parseMapsLine,
  PM_PRESENT,
  PM_SOFT_DIRTY,
  PM_SWAP,
} from './pagemap.ts';

function entries(values: bigint[]): Buffer {
  const b = Buffer.alloc(values.length * 8);
  values.forEach((v, i) => b.writeBigUInt64LE(v, i * 8));
  return b;
}

t.test('decodePagemapEntry', async (t) => {
  // Recorded on this machine (/proc/self/pagemap, as root): present, exclusive, pfn 0x1537a4
  const rec = decodePagemapEntry(0x81000000001537a4n);
  t.same(rec, { present: true, swapped: false, softDirty: false, exclusive: true, file: false, pfn: 0x1537a4n });
  t.same(decodePagemapEntry(0n), { present: false, swapped: false, softDirty: false, exclusive: false, file: false, pfn: 0n });
  const sd = decodePagemapEntry(PM_PRESENT | PM_SOFT_DIRTY | (1n << 61n) | 0x7fffffffffffffn);
  t.equal(sd.softDirty, true);
  t.equal(sd.file, true);
  t.equal(sd.pfn, (1n << 55n) - 1n, 'pfn is bits 0-54 only');
  const sw = decodePagemapEntry(PM_SWAP | PM_SOFT_DIRTY | 0x123n);
  t.same([sw.present, sw.swapped, sw.softDirty], [false, true, true]);
  for (const e of [rec, sd, sw]) t.same(decodePagemapEntry(encodePagemapEntry(e)), e, 'encode round-trips');
});

t.test('pagemapCandidates: soft-dirty, swapped, or not present', async (t) => {
  const buf = entries([
    PM_PRESENT | 0x1000n, // 0 clean present: not a candidate
    PM_PRESENT | PM_SOFT_DIRTY | 0x1001n, // 1 written
    PM_SWAP | 0x55n, // 2 swapped (or migration entry), bit 55 clear: still a candidate
    0n, // 3 not present (hole, or PTE zapped after a write): candidate
    PM_SOFT_DIRTY, // 4 not present but VMA soft-dirty
    0x81000000001537a4n, // 5 recorded clean present page
    PM_PRESENT | (1n << 56n) | (1n << 61n), // 6 clean present file page
    PM_SWAP | PM_SOFT_DIRTY, // 7
  ]);
  t.same([...pagemapCandidates(buf, 0)], [1, 2, 3, 4, 7]);
  t.same([...pagemapCandidates(buf, 1000)], [1001, 1002, 1003, 1004, 1007], 'base offset');
  t.same([...pagemapCandidates(Buffer.alloc(0), 5)], []);
  t.throws(() => pagemapCandidates(Buffer.alloc(12), 0), { code: 'ERR_MEM_PAGEMAP' });
  // agrees with decodePagemapEntry on random entries
  const vals: bigint[] = [];
  let x = 0x243f6a8885a308d3n;
  for (let i = 0; i < 2000; i++) {
    x = (x * 6364136223846793005n + 1442695040888963407n) & 0xffffffffffffffffn;
    vals.push(x);
  }
  const want = vals.flatMap((v, i) => {
    const d = decodePagemapEntry(v);
    return d.softDirty || d.swapped || !d.present ? [i] : [];
  });
  t.same([...pagemapCandidates(entries(vals), 0)], want, 'byte-level decoding matches decodePagemapEntry');
});

const MAPS = `55d0c0a00000-55d0c0b2a000 r--p 00000000 08:01 1835123                    /usr/bin/qemu-system-x86_64
55d0c24a6000-55d0c27e3000 rw-p 00000000 00:00 0                          [heap]
7f1200000000-7f1220000000 rw-s 00000000 00:1a 4242                       /dev/shm/tether vm/ram
7f1220000000-7f1220200000 rw-s 00000000 00:1a 999                        /dev/shm/other
7f4a5c000000-7f4a5c021000 rw-p 00000000 00:00 0 
7ffd5e3b2000-7ffd5e3d3000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
`;

t.test('parseMapsLine / parseMaps', async (t) => {
  const lines = parseMaps(MAPS);
  t.equal(lines.length, 7);
  const ram = lines[2]!;
  t.same(ram, {
    start: 0x7f1200000000n,
    end: 0x7f1220000000n,
    perms: 'rw-s',
    offset: 0n,
    dev: '00:1a',
    inode: 4242,
    path: '/dev/shm/tether vm/ram',
  });
  t.equal(lines[4]!.path, '', 'anonymous mapping with trailing space');
  t.equal(lines[1]!.path, '[heap]');
  t.equal(lines[6]!.start, 0xffffffffff600000n, 'addresses beyond 2^53 stay exact');
  t.equal(parseMapsLine('garbage'), undefined);
  t.equal(parseMapsLine('7f00-7f01 rw-s 0 00:1a 1 /x (deleted)')!.path, '/x (deleted)');
});

t.test('findRamSegments', async (t) => {
  const pages = 0x20000; // 512 MiB
  const segs = findRamSegments(MAPS, '/dev/shm/tether vm/ram', pages);
  t.same(segs, [{ filePage: 0, pages, vpage: 0x7f1200000n }]);
  t.same(findRamSegments(MAPS, '/dev/shm/tether vm/ram', pages, 4242), segs, 'inode matches');
  t.throws(() => findRamSegments(MAPS, '/dev/shm/tether vm/ram', pages, 1), { code: 'ERR_MEM_SOFTDIRTY_MAPPING' }, 'inode mismatch');
  t.throws(() => findRamSegments(MAPS, '/dev/shm/nope', pages), { code: 'ERR_MEM_SOFTDIRTY_MAPPING' });
  t.throws(
    () => findRamSegments(MAPS, '/dev/shm/tether vm/ram', pages + 1),
    { code: 'ERR_MEM_SOFTDIRTY_MAPPING' },
    'file larger than the mapping',
  );
  t.same(findRamSegments(MAPS, '/dev/shm/tether vm/ram', 16), [{ filePage: 0, pages: 16, vpage: 0x7f1200000n }], 'clipped');

  // QEMU's mapping split into VMAs (madvise/mprotect), listed out of order, with a private mapping of the same file
  const split = `7f0000010000-7f0000020000 rw-s 00010000 00:1a 7 /dev/shm/r
7f0000000000-7f0000010000 rw-s 00000000 00:1a 7 /dev/shm/r
7f0000020000-7f0000030000 r--p 00020000 00:1a 7 /dev/shm/r
7f0000020000-7f0000030000 rw-s 00020000 00:1a 7 /dev/shm/r
`;
  t.same(findRamSegments(split, '/dev/shm/r', 48), [
    { filePage: 0, pages: 16, vpage: 0x7f0000000n },
    { filePage: 16, pages: 16, vpage: 0x7f0000010n },
    { filePage: 32, pages: 16, vpage: 0x7f0000020n },
  ]);
  const gap = split
    .split('\n')
    .filter((l) => !l.includes(' 00010000 '))
    .join('\n');
  try {
    findRamSegments(gap, '/dev/shm/r', 48);
    t.fail('gap not detected');
  } catch (e) {
    t.ok(isTetherError(e, 'ERR_MEM_SOFTDIRTY_MAPPING'));
    t.match((e as Error).message, /from 16 of 48/);
  }
});
