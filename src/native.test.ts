import t from 'tap';
import { closeSync, mkdtempSync, openSync, statfsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isTetherError } from './errors.ts';
import {
  hashBuffer,
  hashFile,
  mapRam,
  readPages,
  scanCopy,
  scanDirty,
  unmapRam,
  softDirtyProbe,
  xxh64,
  zeroMask,
  zeroPageHash,
} from './native.ts';
import { page, PAGE, removeDir, scratchDir, sparseFile, throwsCode } from './memory/memory.test-util.ts';

const dir = scratchDir();
const TMPFS_MAGIC = 0x01021994;
t.teardown(() => removeDir(dir));

function hashAt(table: Buffer, pfn: number): bigint {
  return table.readBigUInt64LE(pfn * 8);
}

t.test('xxh64 matches the reference XXH64 (values from xxh64sum)', async (t) => {
  t.equal(xxh64(Buffer.alloc(0)), 0xef46db3751d8e999n);
  t.equal(xxh64(Buffer.from('abc')), 0x44bc2cf5ad770999n);
  t.equal(xxh64(Buffer.alloc(4096)), 0xac869b6f32d8bbdbn);
  t.equal(zeroPageHash(), 0xac869b6f32d8bbdbn);
  const pat = Buffer.alloc(4096);
  for (let i = 0; i < 4096; i++) pat[i] = (i * 31 + 7) & 255;
  t.equal(xxh64(pat), 0xe21174be82dc78d9n);
  t.equal(hashBuffer(pat).readBigUInt64LE(0), 0xe21174be82dc78d9n, 'hashBuffer is little-endian XXH64');
});

t.test('hashBuffer hashes each page; works on unaligned subarrays', async (t) => {
  const buf = Buffer.concat([page(1), page(2), Buffer.alloc(PAGE), page(3)]);
  const h = hashBuffer(buf);
  t.equal(h.length, 32);
  for (let i = 0; i < 4; i++) t.equal(hashAt(h, i), xxh64(buf.subarray(i * PAGE, (i + 1) * PAGE)));
  t.equal(hashAt(h, 2), zeroPageHash());
  const big = Buffer.alloc(PAGE * 2 + 3);
  page(9).copy(big, 3);
  const sub = big.subarray(3, 3 + PAGE);
  t.equal(hashBuffer(sub).readBigUInt64LE(0), xxh64(page(9)));
  t.equal(hashBuffer(Buffer.alloc(0)).length, 0);
});

t.test('hashFile over a sparse file equals hashBuffer over its bytes; holes hash like zero pages', async (t) => {
  const pages = 3000; // spans several 256 KiB chunks and both thread halves
  const f = sparseFile(dir, 'hf.ram', pages);
  t.teardown(() => f.close());
  const content = Buffer.alloc(pages * PAGE);
  const written = [0, 1, 2, 63, 64, 65, 500, 1499, 1500, 1501, 2047, 2048, pages - 1];
  for (const pfn of written) {
    const p = page(pfn + 1);
    f.write(pfn, p);
    p.copy(content, pfn * PAGE);
  }
  // an allocated page that is all zero
  f.write(1000, Buffer.alloc(PAGE));
  const alloc0 = f.allocated();
  const expected = hashBuffer(content);
  for (const threads of [1, 2, 3, 8]) {
    const out = Buffer.alloc(pages * 8, 0xee);
    await hashFile(f.fd, pages, out, threads);
    t.ok(out.equals(expected), `threads=${threads}`);
  }
  const out = Buffer.alloc(pages * 8);
  await hashFile(f.fd, pages, out);
  t.ok(out.equals(expected), 'default threads');
  t.equal(hashAt(out, 3), zeroPageHash(), 'hole page hashes like a zero page');
  t.equal(hashAt(out, 1000), zeroPageHash(), 'allocated zero page too');
  t.equal(f.allocated(), alloc0, 'hashing allocated no hole');
  // a prefix of the file
  const few = Buffer.alloc(70 * 8);
  await hashFile(f.fd, 70, few, 2);
  t.ok(few.equals(expected.subarray(0, 70 * 8)), 'first 70 pages');
  await hashFile(f.fd, 0, Buffer.alloc(0));
});

t.test('scanDirty finds exactly the changed pages', async (t) => {
  for (const threads of [1, 2]) {
    await t.test(`threads=${threads}`, async (t) => {
      const pages = 4096 + 17;
      const last = pages - 1;
      const f = sparseFile(dir, `sd${threads}.ram`, pages);
      t.teardown(() => f.close());
      for (let pfn = 0; pfn < pages; pfn++) if (pfn % 3 !== 2 && !(pfn >= 2000 && pfn < 2100)) f.write(pfn, page(pfn));
      const table = Buffer.alloc(pages * 8);
      await hashFile(f.fd, pages, table, threads);
      const before = Buffer.from(table);
      t.same([...(await scanDirty(f.fd, pages, table, null, threads))], [], 'nothing changed yet');
      t.ok(table.equals(before), 'table untouched');

      const changes = new Map<number, Buffer>([
        [0, page(100_000)], // first pfn
        [last, page(100_001)], // last pfn
        [3, Buffer.alloc(PAGE)], // data page changed to all zero
        [2050, page(100_002)], // inside a previously-hole region
        [2, page(100_003)], // a previously-hole page (pfn % 3 == 2)
        [2047, page(100_004)], // around the thread split
        [2048, page(100_005)],
      ]);
      for (const [pfn, data] of changes) f.write(pfn, data);
      f.write(10, page(10)); // rewritten with identical content: not dirty
      f.write(2099, Buffer.alloc(PAGE)); // hole → allocated zero page: same hash as S's (zero) entry
      const dirty = await scanDirty(f.fd, pages, table, null, threads);
      t.ok(dirty instanceof Uint32Array);
      const want = [...changes.keys()].sort((a, b) => a - b);
      t.same([...dirty], want, 'dirty pfns, ascending');
      for (const [pfn, data] of changes) t.equal(hashAt(table, pfn), xxh64(data), `table[${pfn}] updated`);
      for (let pfn = 0; pfn < pages; pfn++) {
        if (!changes.has(pfn) && hashAt(table, pfn) !== hashAt(before, pfn)) t.fail(`table[${pfn}] changed`);
      }
      t.same([...(await scanDirty(f.fd, pages, table, null, threads))], [], 'second scan finds nothing');
    });
  }
});

t.test('scanDirty never reports or allocates a hole, even when the table disagrees', async (t) => {
  const pages = 64;
  const f = sparseFile(dir, 'holes.ram', pages);
  t.teardown(() => f.close());
  f.write(5, page(5));
  // S's table: every page has non-zero content (D has not received most of it yet).
  const table = Buffer.alloc(pages * 8);
  for (let i = 0; i < pages; i++) table.writeBigUInt64LE(xxh64(page(1000 + i)), i * 8);
  table.writeBigUInt64LE(xxh64(page(5)), 5 * 8);
  const alloc0 = f.allocated();
  t.same([...(await scanDirty(f.fd, pages, table, null, 2))], []);
  t.same([...(await scanDirty(f.fd, pages, table, Uint32Array.from([0, 1, 5, 63]), 2))], []);
  t.equal(f.allocated(), alloc0, 'no hole was allocated');
});

t.test('candidates restrict the scan', async (t) => {
  const pages = 5000;
  const f = sparseFile(dir, 'cand.ram', pages);
  t.teardown(() => f.close());
  for (let pfn = 0; pfn < pages; pfn += 2) f.write(pfn, page(pfn)); // odd pages are holes
  const table = Buffer.alloc(pages * 8);
  await hashFile(f.fd, pages, table);
  const changed = [0, 2, 4, 6, 1000, 1002, 2500, 4998];
  for (const pfn of changed) f.write(pfn, page(pfn + 77));
  f.write(1001, page(1)); // hole filled: dirty unless excluded
  for (const threads of [1, 2]) {
    const tb = Buffer.from(table);
    const d = await scanDirty(f.fd, pages, tb, Uint32Array.from([4998, 2, 4, 1001, 3, 2500, 4, 7]), threads);
    t.same([...d], [2, 4, 1001, 2500, 4998], `unsorted, duplicated candidates; threads=${threads}`);
    t.equal(hashAt(tb, 0), hashAt(table, 0), 'non-candidate 0 not updated');
    const d2 = await scanDirty(f.fd, pages, tb, null, threads);
    t.same([...d2], [0, 6, 1000, 1002], 'the rest found by a full scan');
  }
  const tb = Buffer.from(table);
  t.same([...(await scanDirty(f.fd, pages, tb, new Uint32Array(0)))], [], 'empty candidates');
  // many candidates, contiguous runs longer than a chunk
  const all = new Uint32Array(pages).map((_, i) => i);
  t.same([...(await scanDirty(f.fd, pages, tb, all, 2))], [0, 2, 4, 6, 1000, 1001, 1002, 2500, 4998], 'all as candidates');
});

t.test('readPages coalesces runs and keeps order', async (t) => {
  const pages = 300;
  const f = sparseFile(dir, 'rp.ram', pages);
  t.teardown(() => f.close());
  for (let pfn = 0; pfn < pages; pfn++) if (pfn !== 7) f.write(pfn, page(pfn));
  const pfns = Uint32Array.from([5, 6, 7, 8, 100, 299, 0, 1, 2, 200, 199, 50, 50]);
  const out = Buffer.alloc(pfns.length * PAGE + 5, 0xaa);
  readPages(f.fd, pfns, out);
  pfns.forEach((pfn, i) => {
    const want = pfn === 7 ? Buffer.alloc(PAGE) : page(pfn);
    t.ok(out.subarray(i * PAGE, (i + 1) * PAGE).equals(want), `slot ${i} = pfn ${pfn}`);
  });
  t.equal(out[pfns.length * PAGE], 0xaa, 'bytes past the pages untouched');
  // a long contiguous run (> 64 MiB cap is too big for a test; use 256 pages)
  const run = new Uint32Array(256).map((_, i) => i + 10);
  const big = Buffer.alloc(256 * PAGE);
  readPages(f.fd, run, big);
  t.ok(big.subarray(200 * PAGE, 201 * PAGE).equals(page(210)));
  readPages(f.fd, new Uint32Array(0), Buffer.alloc(0));
});

t.test('zeroMask marks all-zero pages', async (t) => {
  const late = Buffer.alloc(PAGE);
  late[PAGE - 1] = 1;
  const mid = Buffer.alloc(PAGE);
  mid[2000] = 0x80;
  const early = Buffer.alloc(PAGE);
  early[0] = 1;
  const buf = Buffer.concat([Buffer.alloc(PAGE), late, mid, early, Buffer.alloc(PAGE), page(3)]);
  const out = new Uint8Array(8).fill(9);
  t.equal(zeroMask(buf, out), 2);
  t.same([...out], [1, 0, 0, 0, 1, 0, 9, 9]);
  // unaligned view
  const shifted = Buffer.alloc(PAGE * 2 + 1);
  shifted[1 + PAGE] = 3;
  const m = new Uint8Array(2);
  t.equal(zeroMask(shifted.subarray(1, 1 + 2 * PAGE), m), 1);
  t.same([...m], [1, 0]);
});

t.test('bad arguments throw coded errors', async (t) => {
  const f = sparseFile(dir, 'args.ram', 16);
  t.teardown(() => f.close());
  const A = 'ERR_MEM_NATIVE_ARGS';
  const any = (v: unknown) => v as never;
  throwsCode(t, () => hashFile(-1, 16, Buffer.alloc(128)), A, 'negative fd');
  throwsCode(t, () => hashFile(any('3'), 16, Buffer.alloc(128)), A, 'fd not a number');
  throwsCode(t, () => hashFile(1.5, 16, Buffer.alloc(128)), A, 'fractional fd');
  throwsCode(t, () => hashFile(f.fd, 16, Buffer.alloc(127)), A, 'out too small');
  throwsCode(t, () => hashFile(f.fd, 16, Buffer.alloc(136)), A, 'out too large');
  throwsCode(t, () => hashFile(f.fd, 17, Buffer.alloc(136)), A, 'file shorter than pages');
  throwsCode(t, () => hashFile(f.fd, -1, Buffer.alloc(0)), A, 'negative pages');
  throwsCode(t, () => hashFile(f.fd, 16, any([1, 2])), A, 'out not a buffer');
  throwsCode(t, () => hashFile(f.fd, 16, any(new Uint32Array(32))), A, 'out wrong typed array');
  throwsCode(t, () => hashFile(f.fd, 16, Buffer.alloc(128), 0), A, 'threads 0');
  throwsCode(t, () => hashFile(f.fd, 16, Buffer.alloc(128), 1000), A, 'threads too many');
  throwsCode(t, () => scanDirty(f.fd, 16, Buffer.alloc(128), Uint32Array.from([16])), A, 'candidate out of range');
  throwsCode(t, () => scanDirty(f.fd, 16, Buffer.alloc(128), any([1])), A, 'candidates not Uint32Array');
  throwsCode(t, () => scanDirty(f.fd, 16, Buffer.alloc(8)), A, 'table size');
  throwsCode(t, () => hashBuffer(Buffer.alloc(100)), A, 'hashBuffer length');
  throwsCode(t, () => zeroMask(Buffer.alloc(2 * PAGE), new Uint8Array(1)), A, 'zeroMask out too small');
  throwsCode(t, () => zeroMask(Buffer.alloc(5), new Uint8Array(1)), A, 'zeroMask length');
  throwsCode(t, () => readPages(f.fd, Uint32Array.from([1, 2]), Buffer.alloc(PAGE)), A, 'readPages out too small');
  throwsCode(t, () => readPages(f.fd, Uint32Array.from([16]), Buffer.alloc(PAGE)), A, 'readPages past EOF');
  throwsCode(t, () => readPages(f.fd, any(null), Buffer.alloc(PAGE)), A, 'readPages pfns null');
  throwsCode(t, () => (hashFile as (...a: unknown[]) => void)(f.fd), A, 'missing arguments');

  // a closed fd
  const p = join(dir, 'closed.ram');
  writeFileSync(p, Buffer.alloc(PAGE));
  const fd = openSync(p, 'r');
  closeSync(fd);
  try {
    await hashFile(fd, 1, Buffer.alloc(8));
    t.fail('closed fd did not throw');
  } catch (e) {
    t.ok(isTetherError(e, A), 'closed fd');
    t.equal((e as { details?: { errno?: number } }).details?.errno, 9, 'errno EBADF');
  }
  // a directory fd
  const dfd = openSync(dir, 'r');
  t.teardown(() => closeSync(dfd));
  throwsCode(t, () => hashFile(dfd, 1, Buffer.alloc(8)), A, 'directory fd');

  // an I/O error: a write-only fd passes fstat but pread fails with EBADF
  const wo = sparseFile(dir, 'wo.ram', 4);
  wo.write(0, page(1));
  wo.close();
  const wofd = openSync(wo.path, 'a');
  t.teardown(() => closeSync(wofd));
  try {
    await hashFile(wofd, 4, Buffer.alloc(32), 1);
    t.fail('write-only fd did not throw');
  } catch (e) {
    t.ok(isTetherError(e, 'ERR_MEM_IO'), `ERR_MEM_IO (${(e as Error).message})`);
    t.equal((e as { details?: { errno?: number; syscall?: string } }).details?.errno, 9, 'errno EBADF');
    t.equal((e as { details?: { syscall?: string } }).details?.syscall, 'pread');
  }
});

t.test('softDirtyProbe reports a functional result', async (t) => {
  const p = softDirtyProbe();
  t.type(p.supported, 'boolean');
  t.type(p.before, 'bigint');
  if (!p.supported && p.clearRefsErrno === 0 && p.pagemapErrno === 0) {
    t.equal(p.after & (1n << 55n), 0n, 'kernel accepted clear_refs but never set bit 55');
  }
});

t.test('tmpfs (mapped) and other filesystems (pread) give the same hashes and dirty pages', async (t) => {
  // RAM files on tmpfs are hashed through a read-only mapping, anything else through pread;
  // a directory under the project is on a disk filesystem (here and in CI).
  const diskDir = mkdtempSync(join(process.cwd(), '.tether-mem-test-'));
  t.teardown(() => removeDir(diskDir));
  const pages = 2500;
  const files = [sparseFile(dir, 'same.ram', pages), sparseFile(diskDir, 'same.ram', pages)];
  t.teardown(() => files.forEach((f) => f.close()));
  t.equal(statfsSync(dir).type, TMPFS_MAGIC, 'scratch dir is tmpfs');
  t.not(statfsSync(diskDir).type, TMPFS_MAGIC, 'the other dir is not');
  for (let pfn = 0; pfn < pages; pfn += 7) for (const f of files) f.write(pfn, page(pfn));
  const tables = [Buffer.alloc(pages * 8), Buffer.alloc(pages * 8)];
  for (let i = 0; i < 2; i++) await hashFile(files[i]!.fd, pages, tables[i]!, 2);
  t.ok(tables[0]!.equals(tables[1]!), 'same baseline hashes');
  for (const pfn of [0, 3, 700, 1299, pages - 1]) for (const f of files) f.write(pfn, page(pfn + 50_000));
  const alloc0 = files[0]!.allocated();
  const map = mapRam(files[0]!.fd, pages);
  t.ok(map, 'tmpfs file mapped');
  t.equal(mapRam(files[1]!.fd, pages), null, 'a file elsewhere is not mapped: pread');
  t.teardown(() => unmapRam(map!));
  const dirty = await Promise.all([0, 1].map((i) => scanCopy(files[i]!.fd, pages, tables[i]!, null, 2, i === 0 ? map : null)));
  t.same([...dirty[0]!.pfns], [0, 3, 700, 1299, pages - 1], 'dirty pages found through the mapping');
  t.same([...dirty[1]!.pfns], [...dirty[0]!.pfns], 'and the same through pread');
  t.ok(dirty[0]!.data.equals(dirty[1]!.data), 'with the same bytes');
  t.ok(tables[0]!.equals(tables[1]!), 'same tables after the scan');
  t.equal(files[0]!.allocated(), alloc0, 'the mapped scan allocated no hole');
});

t.test('mapRam handles: checked against the file, released after the scan that reads them', async (t) => {
  const pages = 4096;
  const f = sparseFile(dir, 'map.ram', pages);
  const g = sparseFile(dir, 'other.ram', pages);
  t.teardown(() => [f, g].forEach((x) => x.close()));
  for (let pfn = 0; pfn < pages; pfn += 3) f.write(pfn, page(pfn));
  const expected = Buffer.alloc(pages * 8);
  await hashFile(f.fd, pages, expected, 1);
  const map = mapRam(f.fd, pages)!;
  t.ok(map);
  const viaMap = Buffer.alloc(pages * 8);
  await hashFile(f.fd, pages, viaMap, 2, map);
  t.ok(viaMap.equals(expected), 'hashFile through the mapping = through pread');
  throwsCode(t, () => void scanDirty(g.fd, pages, Buffer.from(expected), null, 1, map), 'ERR_MEM_NATIVE_ARGS', 'map of another file');
  throwsCode(
    t,
    () => void scanDirty(f.fd, pages + 1, Buffer.alloc((pages + 1) * 8), null, 1, map),
    'ERR_MEM_NATIVE_ARGS',
    'longer than the map',
  );
  throwsCode(t, () => void scanDirty(f.fd, pages, Buffer.from(expected), null, 1, {} as never), 'ERR_MEM_NATIVE_ARGS', 'not a handle');
  // unmapped while a scan runs: the scan finishes on the mapping, later calls are refused
  f.write(7, page(70_007));
  const table = Buffer.from(expected);
  const running = scanCopy(f.fd, pages, table, null, 2, map);
  unmapRam(map);
  const got = await running;
  t.same([...got.pfns], [7], 'the scan in flight completed');
  t.ok(got.data.equals(page(70_007)), 'with the page bytes');
  throwsCode(t, () => void scanDirty(f.fd, pages, table, null, 1, map), 'ERR_MEM_NATIVE_ARGS', 'after unmapRam');
  unmapRam(map); // idempotent
  t.equal(mapRam(f.fd, 0), null, 'nothing to map');
});
