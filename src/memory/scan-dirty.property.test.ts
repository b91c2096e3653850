import t from 'tap';
import fc from 'fast-check';
import { hashFile, scanCopy, scanDirty } from '../native.ts';
import { PAGE, removeDir, scratchDir, sparseFile } from './memory.test-util.ts';

const dir = scratchDir();
t.teardown(() => removeDir(dir));

/** A page filled with one byte value (0 = zero page); small alphabet so rewrites often repeat content. */
function filled(v: number): Buffer {
  return Buffer.alloc(PAGE, v);
}

const pagesArb = fc.integer({ min: 1, max: 3000 });

const scenario = pagesArb.chain((pages) =>
  fc.record({
    pages: fc.constant(pages),
    // initial content: page → byte (absent = hole)
    initial: fc.array(fc.tuple(fc.integer({ min: 0, max: pages - 1 }), fc.integer({ min: 0, max: 4 })), {
      maxLength: 200,
    }),
    // writes after the table was made
    writes: fc.array(fc.tuple(fc.integer({ min: 0, max: pages - 1 }), fc.integer({ min: 0, max: 4 })), {
      maxLength: 200,
    }),
    // some contiguous runs to exercise chunking
    runs: fc.array(fc.tuple(fc.integer({ min: 0, max: pages - 1 }), fc.integer({ min: 1, max: 200 }), fc.integer({ min: 1, max: 4 })), {
      maxLength: 3,
    }),
    threads: fc.integer({ min: 1, max: 3 }),
    candidates: fc.option(fc.array(fc.integer({ min: 0, max: pages - 1 }), { maxLength: 300 }), { nil: null }),
  }),
);

let n = 0;
t.test('scanDirty returns exactly the pages whose content changed', async (t) => {
  await fc.assert(
    fc.asyncProperty(scenario, async (s) => {
      const f = sparseFile(dir, `p${n++}.ram`, s.pages);
      try {
        // model: content byte per page; holes read as 0
        const model = new Int16Array(s.pages).fill(-1); // -1 = hole
        for (const [pfn, v] of s.initial) {
          f.write(pfn, filled(v));
          model[pfn] = v;
        }
        const table = Buffer.alloc(s.pages * 8);
        await hashFile(f.fd, s.pages, table, s.threads);
        const base = Int16Array.from(model, (v) => (v < 0 ? 0 : v)); // S's view: hole = zero page
        const writes = [...s.writes];
        for (const [start, len, v] of s.runs) for (let p = start; p < Math.min(s.pages, start + len); p++) writes.push([p, v]);
        for (const [pfn, v] of writes) {
          f.write(pfn, filled(v));
          model[pfn] = v;
        }
        const inScope = s.candidates ? new Set(s.candidates) : null;
        const expected: number[] = [];
        for (let p = 0; p < s.pages; p++) {
          const now = model[p]!;
          if (now >= 0 && now !== base[p] && (!inScope || inScope.has(p))) expected.push(p);
        }
        const cands = s.candidates ? Uint32Array.from(s.candidates) : null;
        const got = [...(await scanDirty(f.fd, s.pages, table, cands, s.threads))];
        if (JSON.stringify(got) !== JSON.stringify(expected)) {
          throw new Error(`got ${JSON.stringify(got)} expected ${JSON.stringify(expected)}`);
        }
        // the table now reflects every scanned page: scanning the same scope again finds nothing
        const again = [...(await scanDirty(f.fd, s.pages, table, cands, s.threads))];
        if (again.length !== 0) throw new Error(`second scan found ${JSON.stringify(again)}`);
        // and a full hash of the file agrees with the table on every allocated, scanned page
        const fresh = Buffer.alloc(s.pages * 8);
        await hashFile(f.fd, s.pages, fresh, 1);
        for (let p = 0; p < s.pages; p++) {
          if (
            model[p]! >= 0 &&
            (!inScope || inScope.has(p)) &&
            !fresh.subarray(p * 8, p * 8 + 8).equals(table.subarray(p * 8, p * 8 + 8))
          ) {
            throw new Error(`table[${p}] stale`);
          }
        }
      } finally {
        f.close();
      }
    }),
    { numRuns: 150 },
  );
  t.pass('property held');
});

let m = 0;
t.test('scanCopy finds what scanDirty finds, with the bytes of each page (zero pages flagged only)', async (t) => {
  await fc.assert(
    fc.asyncProperty(scenario, async (s) => {
      const f = sparseFile(dir, `c${m++}.ram`, s.pages);
      try {
        const content = Buffer.alloc(s.pages * PAGE);
        const put = (pfn: number, v: number) => {
          f.write(pfn, filled(v));
          content.fill(v, pfn * PAGE, (pfn + 1) * PAGE);
        };
        for (const [pfn, v] of s.initial) put(pfn, v);
        const table = Buffer.alloc(s.pages * 8);
        await hashFile(f.fd, s.pages, table, s.threads);
        for (const [pfn, v] of s.writes) put(pfn, v);
        for (const [start, len, v] of s.runs) for (let p = start; p < Math.min(s.pages, start + len); p++) put(p, v);
        const cands = s.candidates ? Uint32Array.from(s.candidates) : null;
        const twin = Buffer.from(table);
        const want = [...(await scanDirty(f.fd, s.pages, twin, cands, s.threads))];
        const got = await scanCopy(f.fd, s.pages, table, cands, s.threads);
        if (JSON.stringify([...got.pfns]) !== JSON.stringify(want)) throw new Error(`pfns ${[...got.pfns]} want ${want}`);
        if (!table.equals(twin)) throw new Error('scanCopy left another table than scanDirty');
        if (got.zero.length !== got.pfns.length) throw new Error('zero mask length');
        let off = 0;
        for (let i = 0; i < got.pfns.length; i++) {
          const bytes = content.subarray(got.pfns[i]! * PAGE, (got.pfns[i]! + 1) * PAGE);
          const isZero = bytes.every((b) => b === 0);
          if (got.zero[i] !== (isZero ? 1 : 0)) throw new Error(`zero flag of pfn ${got.pfns[i]}`);
          if (isZero) continue;
          if (!got.data.subarray(off, off + PAGE).equals(bytes)) throw new Error(`bytes of pfn ${got.pfns[i]}`);
          off += PAGE;
        }
        if (off !== got.data.length) throw new Error(`data has ${got.data.length} bytes, expected ${off}`);
      } finally {
        f.close();
      }
    }),
    { numRuns: 150 },
  );
  t.pass('property held');
});
