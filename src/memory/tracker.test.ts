import t from 'tap';
import { mkdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync, openSync, closeSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { isTetherError } from '../errors.ts';
import { hashBuffer, softDirtyProbe, xxh64 } from '../native.ts';
import { encodePagemapEntry } from './pagemap.ts';
import { hashRamFile, ramPages } from './ram.ts';
import { ScanTracker } from './scan.ts';
import { SoftDirtyTracker } from './soft-dirty.ts';
import { createTracker, softDirtySupported } from './select.ts';
import { page, PAGE, rejectsCode, removeDir, scratchDir, sparseFile } from './memory.test-util.ts';

const dir = scratchDir();
t.teardown(() => removeDir(dir));

t.test('ramPages', async (t) => {
  t.equal(ramPages(512 * 1024 * 1024), 131072);
  for (const bad of [0, -4096, 4095, 4096.5, NaN, 2 ** 60]) t.throws(() => ramPages(bad), { code: 'ERR_MEM_RAM_SIZE' }, String(bad));
});

t.test('hashRamFile', async (t) => {
  const f = sparseFile(dir, 'hr.ram', 100);
  f.write(3, page(3));
  f.close();
  const table = await hashRamFile(f.path, 100 * PAGE);
  const content = Buffer.alloc(100 * PAGE);
  page(3).copy(content, 3 * PAGE);
  t.ok(table.equals(hashBuffer(content)));
  t.ok((await hashRamFile(f.path, 100 * PAGE, { threads: 1 })).equals(table));
  await rejectsCode(t, hashRamFile(join(dir, 'missing'), PAGE), 'ERR_MEM_RAM_FILE', 'missing file');
  await rejectsCode(t, hashRamFile(f.path, 101 * PAGE), 'ERR_MEM_RAM_FILE', 'file too small');
  await rejectsCode(t, hashRamFile(f.path, 100), 'ERR_MEM_RAM_SIZE', 'size not page multiple');
});

t.test('scan tracker', async (t) => {
  const pages = 3000;
  const f = sparseFile(dir, 'scan.ram', pages);
  t.teardown(() => f.close());
  for (let p = 0; p < 1000; p++) f.write(p, page(p));
  const opts = { ramPath: f.path, ramBytes: pages * PAGE, qemuPid: process.pid };
  const tr = await createTracker('scan', opts);
  t.equal(tr.kind, 'scan');
  t.match(tr.reason, /scan/);
  await rejectsCode(t, tr.collect(), 'ERR_MEM_TRACKER_STATE', 'collect before start');
  await rejectsCode(t, tr.start(Buffer.alloc(8)), 'ERR_MEM_TABLE_SIZE', 'wrong table size');
  const table = await hashRamFile(f.path, pages * PAGE);
  await tr.start(table);
  await rejectsCode(t, tr.start(table), 'ERR_MEM_TRACKER_STATE', 'started twice');
  t.same([...(await tr.collect())], []);
  f.write(0, page(5000));
  f.write(2999, page(5001)); // a page post-copy never placed: hole before
  f.write(500, Buffer.alloc(PAGE));
  t.same([...(await tr.collect())], [0, 500, 2999]);
  t.equal(table.readBigUInt64LE(2999 * 8), xxh64(page(5001)), 'table updated in place');
  t.same([...(await tr.collect())], []);
  await tr.close();
  await tr.close();
  await rejectsCode(t, tr.collect(), 'ERR_MEM_TRACKER_STATE', 'collect after close');

  await rejectsCode(t, ScanTracker.open({ ...opts, ramBytes: (pages + 1) * PAGE }), 'ERR_MEM_RAM_FILE', 'file smaller than RAM');
  await rejectsCode(t, ScanTracker.open({ ...opts, ramPath: join(dir, 'nope') }), 'ERR_MEM_RAM_FILE', 'no file');
  await rejectsCode(t, createTracker('bogus' as never, opts), 'ERR_MEM_TRACKER_KIND', 'bad kind');
});

t.test('auto picks what the kernel supports and says why', async (t) => {
  const probe = softDirtyProbe();
  t.equal(await softDirtySupported(), probe.supported);
  const f = sparseFile(dir, 'auto.ram', 16);
  t.teardown(() => f.close());
  const opts = { ramPath: f.path, ramBytes: 16 * PAGE, qemuPid: process.pid };
  if (!probe.supported) {
    const tr = await createTracker('auto', opts);
    t.equal(tr.kind, 'scan');
    t.match(tr.reason, /auto: soft-dirty unavailable/);
    await tr.close();
    await rejectsCode(t, createTracker('soft-dirty', opts), 'ERR_MEM_SOFTDIRTY_UNSUPPORTED', 'explicit soft-dirty');
  } else {
    // This process maps no RAM file: auto falls back to scan, explicit soft-dirty fails.
    const tr = await createTracker('auto', opts);
    t.equal(tr.kind, 'scan');
    t.match(tr.reason, /soft-dirty failed to start/);
    await tr.close();
    await rejectsCode(t, createTracker('soft-dirty', opts), 'ERR_MEM_SOFTDIRTY_MAPPING', 'explicit soft-dirty');
  }
});

/**
 * The soft-dirty tracker against a fake /proc/<pid> (maps, pagemap, clear_refs
 * as regular files): this kernel has no soft-dirty, so the kernel's side is
 * played by the test.
 */
t.test('soft-dirty tracker (fake procfs)', async (t) => {
  const pages = 2000;
  const pid = 4242;
  const f = sparseFile(dir, 'sd.ram', pages);
  t.teardown(() => f.close());
  for (let p = 0; p < 1500; p++) f.write(p, page(p));
  const ino = statSync(f.path).ino;
  const procRoot = join(dir, 'proc');
  const pdir = join(procRoot, String(pid));
  mkdirSync(pdir, { recursive: true });
  // QEMU's mapping of the RAM file, split in two VMAs, plus noise
  const base = 0x10000; // virtual page of file page 0
  const vaddr = (vp: number) => (vp * PAGE).toString(16);
  const mapsLines = [
    `${vaddr(0x100)}-${vaddr(0x200)} r-xp 00000000 08:01 11 /usr/bin/qemu-system-x86_64`,
    `${vaddr(base)}-${vaddr(base + 1200)} rw-s 00000000 00:1a ${ino} ${f.path}`,
    `${vaddr(base + 1200)}-${vaddr(base + pages)} rw-s ${(1200 * PAGE).toString(16)} 00:1a ${ino} ${f.path}`,
    `${vaddr(0x90000)}-${vaddr(0x90010)} rw-p 00000000 00:00 0 `,
  ];
  writeFileSync(join(pdir, 'maps'), mapsLines.join('\n') + '\n');
  /** smaps as the kernel prints it: each maps line, then fields, VmFlags last; `ram` fields for the RAM VMAs. */
  const writeSmaps = (ram: { thp: 0 | 1; flags: string }) =>
    writeFileSync(
      join(pdir, 'smaps'),
      mapsLines
        .map((l) => {
          const isRam = l.includes(f.path);
          return [
            l,
            'Size:               4096 kB',
            `THPeligible:    ${isRam ? ram.thp : 0}`,
            `VmFlags: ${isRam ? ram.flags : 'rd ex mr mw me'} `,
          ].join('\n');
        })
        .join('\n') + '\n',
    );
  writeSmaps({ thp: 0, flags: 'rd wr sh mr mw me ms sd' });
  const pm = openSync(join(pdir, 'pagemap'), 'w+');
  t.teardown(() => closeSync(pm));
  const setEntry = (filePage: number, v: bigint) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(v);
    writeSync(pm, b, 0, 8, (base + filePage) * 8);
  };
  const clean = encodePagemapEntry({ present: true, pfn: 0x1234n });
  const dirtyPte = encodePagemapEntry({ present: true, softDirty: true, pfn: 0x1234n });
  const allClean = () => {
    const b = Buffer.alloc(pages * 8);
    for (let i = 0; i < pages; i++) b.writeBigUInt64LE(clean, i * 8);
    writeSync(pm, b, 0, b.length, base * 8);
  };
  allClean();
  const clearRefs = join(pdir, 'clear_refs');
  writeFileSync(clearRefs, '');

  // QEMU was given a path through a symlink; maps shows the canonical path.
  const link = join(dir, 'sd-link.ram');
  symlinkSync(f.path, link);
  const opts = { ramPath: link, ramBytes: pages * PAGE, qemuPid: pid, procRoot, threads: 2 };
  const tr = await SoftDirtyTracker.open(opts);
  t.equal(tr.kind, 'soft-dirty');
  const table = await hashRamFile(f.path, pages * PAGE);
  await tr.start(table);

  // Written before the first collect, with no soft-dirty mark: the first collect scans everything.
  f.write(5, page(9005));
  f.write(1800, page(9006)); // into a hole
  t.same([...(await tr.collect())], [5, 1800], 'first collect is a full scan');
  t.equal(readFileSync(clearRefs, 'utf8'), '4', 'soft-dirty bits cleared');
  t.equal(tr.stats.lastCandidates, pages);

  writeFileSync(clearRefs, '');
  f.write(7, page(9007));
  setEntry(7, dirtyPte); // written, marked
  f.write(9, page(9009)); // changed but NOT marked: soft-dirty says clean, so it is not a candidate
  f.write(1199, page(9011));
  setEntry(1199, encodePagemapEntry({ swapped: true, pfn: 0x99n })); // swapped: candidate without bit 55
  setEntry(13, dirtyPte); // soft-dirty (e.g. placed by post-copy) but equal to S's copy
  f.write(1300, page(9015));
  setEntry(1300, 0n); // PTE zapped after the write (reclaim): not present → candidate
  setEntry(1900, 0n); // not present and a hole: candidate, skipped as a hole
  setEntry(1201, dirtyPte); // second VMA
  f.write(1201, page(9017));
  const d = await tr.collect();
  t.same([...d], [7, 1199, 1201, 1300], 'soft-dirty, swapped and non-present candidates, filtered by hash');
  t.equal(tr.stats.lastCandidates, 6);
  t.equal(readFileSync(clearRefs, 'utf8'), '4');
  t.equal(table.readBigUInt64LE(9 * 8), xxh64(page(9)), 'unmarked page 9 stays as S had it');

  allClean();
  t.same([...(await tr.collect())], [], 'nothing marked: nothing collected');
  t.equal(tr.stats.lastCandidates, 0);

  // QEMU's mapping vanished (e.g. QEMU replaced): a coded error, not a silent empty result
  writeFileSync(join(pdir, 'maps'), '');
  await rejectsCode(t, tr.collect(), 'ERR_MEM_SOFTDIRTY_MAPPING', 'mapping gone');
  await tr.close();

  // Preconditions (docs/lab.md shows why on Debian's 6.1 kernel). The maps are back.
  writeFileSync(join(pdir, 'maps'), mapsLines.join('\n') + '\n');
  const swaps = join(procRoot, 'swaps');
  const swapHeader = 'Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n';
  writeFileSync(swaps, swapHeader);
  await (await SoftDirtyTracker.open(opts)).close(); // swap off: opens
  writeFileSync(swaps, swapHeader + '/dev/vdc                                partition\t262140\t\t0\t\t-2\n');
  await rejectsCode(t, SoftDirtyTracker.open(opts), 'ERR_MEM_SOFTDIRTY_RECLAIM', 'swap on, RAM not mlocked');
  writeSmaps({ thp: 0, flags: 'rd wr sh mr mw me ms lo sd' });
  const locked = await SoftDirtyTracker.open(opts);
  t.equal(locked.kind, 'soft-dirty', 'swap on, RAM mlocked: opens');
  await locked.close();
  writeSmaps({ thp: 1, flags: 'rd wr sh mr mw me ms lo sd hg' });
  await rejectsCode(t, SoftDirtyTracker.open(opts), 'ERR_MEM_SOFTDIRTY_THP', 'THP-eligible RAM mapping');
  const auto = await createTracker('auto', opts).catch((e: unknown) => e);
  // auto falls back to scan when soft-dirty is refused (only where this kernel has soft-dirty at all)
  if (softDirtyProbe().supported) t.equal((auto as { kind: string }).kind, 'scan', 'auto: scan');

  // Swap switched on after open, RAM not mlocked: the next collect scans the whole file.
  writeSmaps({ thp: 0, flags: 'rd wr sh mr mw me ms sd' });
  writeFileSync(swaps, swapHeader);
  const late = await SoftDirtyTracker.open(opts);
  await late.start(await hashRamFile(f.path, pages * PAGE));
  await late.collect();
  allClean();
  f.write(11, page(9111)); // written, not marked (as after a reclaim and a read fault)
  t.same([...(await late.collect())], [], 'swap off: an unmarked write is not a candidate');
  writeFileSync(swaps, swapHeader + '/dev/vdc partition 262140 0 -2\n');
  f.write(12, page(9112));
  t.same([...(await late.collect())], [11, 12], 'swap on since open: full scan finds unmarked writes');
  t.equal(late.stats.fullScans, 1);
  t.equal(late.stats.lastCandidates, pages);
  await late.close();
  rmSync(swaps);
  writeFileSync(join(pdir, 'maps'), '');

  await rejectsCode(t, SoftDirtyTracker.open({ ...opts, qemuPid: 777 }), 'ERR_MEM_SOFTDIRTY_PID', 'no such pid');
  await rejectsCode(t, SoftDirtyTracker.open(opts), 'ERR_MEM_SOFTDIRTY_MAPPING', 'file not mapped');
  rmSync(clearRefs);
});
