/**
 * Dirty-page scan benchmark: `npx tsx tools/bench/scan.ts [--mib 512] [--runs 5]`
 *
 * Creates a fully populated RAM-sized file in /dev/shm, then measures (median
 * of N runs) hashFile, scanDirty with 0 and with 16 MiB of dirty pages (full
 * scan and candidate-restricted, as the soft-dirty tracker calls it), and
 * readPages of the dirty set, for 1 and 2 threads. Prints a table and writes
 * bench-results/scan.json. The file is deleted afterwards.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, ftruncateSync, mkdirSync, openSync, readSync, unlinkSync, writeFileSync, writeSync } from 'node:fs';
import { cpus, release } from 'node:os';
import { join } from 'node:path';
import { hashFile, mapRam, PAGE_SIZE, readPages, scanCopy, scanDirty, unmapRam, zeroMask } from '../../src/native.ts';
import { arg } from './args.ts';

const MIB = 1024 * 1024;
const ramMiB = arg('mib', 512);
const runs = arg('runs', 5);
const dirtyMiB = Math.min(16, ramMiB / 2);
const ramBytes = ramMiB * MIB;
const pages = ramBytes / PAGE_SIZE;
const dirtyPages = (dirtyMiB * MIB) / PAGE_SIZE;
const path = `/dev/shm/tether-bench-scan-${process.pid}.ram`;

interface Row {
  name: string;
  threads: number;
  medianMs: number;
  minMs: number;
  maxMs: number;
  /** bytes of RAM covered per second (GB/s, 1e9) */
  gbPerS: number;
  note?: string;
}
const rows: Row[] = [];

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

async function measure(
  name: string,
  threads: number,
  bytes: number,
  fn: () => void | Promise<void>,
  setup?: () => void,
  note?: string,
): Promise<void> {
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    setup?.();
    const t0 = process.hrtime.bigint();
    await fn();
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  const medianMs = median(times);
  const row: Row = {
    name,
    threads,
    medianMs: +medianMs.toFixed(2),
    minMs: +Math.min(...times).toFixed(2),
    maxMs: +Math.max(...times).toFixed(2),
    gbPerS: +(bytes / (medianMs / 1e3) / 1e9).toFixed(2),
  };
  if (note) row.note = note;
  rows.push(row);
  console.log(
    `${name.padEnd(34)} ${String(threads).padStart(7)} ${row.medianMs.toFixed(1).padStart(10)} ${row.minMs.toFixed(1).padStart(8)} ${row.maxMs.toFixed(1).padStart(8)} ${row.gbPerS.toFixed(2).padStart(7)}`,
  );
}

/** Deterministic, scattered dirty pfns (every page distinct). */
function dirtySet(): Uint32Array {
  const set = new Set<number>();
  let x = 12345;
  while (set.size < dirtyPages) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    set.add(x % pages);
  }
  return Uint32Array.from([...set].sort((a, b) => a - b));
}

async function main(): Promise<void> {
  const fd = openSync(path, 'w+');
  try {
    populate(fd);
    const dirty = dirtySet();
    let gen = 0;
    const page = Buffer.alloc(PAGE_SIZE);
    const makeDirty = () => {
      gen++;
      for (const pfn of dirty) {
        page.writeUInt32LE(gen, 0);
        page.writeUInt32LE(pfn, 4);
        writeSync(fd, page, 0, PAGE_SIZE, pfn * PAGE_SIZE);
      }
    };

    console.log(
      `RAM file ${ramMiB} MiB (${pages} pages) on /dev/shm, dirty set ${dirtyMiB} MiB (${dirtyPages} scattered pages), median of ${runs}`,
    );
    console.log(`host: ${cpus().length} × ${cpus()[0]?.model ?? '?'}, kernel ${release()}, node ${process.version}`);
    console.log(`${'measurement'.padEnd(34)} threads  median ms   min ms   max ms    GB/s`);

    // Reference: what plain Node pread of the whole file costs.
    const rbuf = Buffer.allocUnsafe(2 * MIB);
    await measure('node pread 2 MiB chunks (ref)', 1, ramBytes, () => {
      for (let off = 0; off < ramBytes; off += rbuf.length) readSync(fd, rbuf, 0, rbuf.length, off);
    });
    const table = Buffer.alloc(pages * 8);
    for (const threads of [1, 2]) {
      await measure('hashFile', threads, ramBytes, () => hashFile(fd, pages, table, threads));
    }
    for (const threads of [1, 2]) {
      await measure('scanDirty full, 0 dirty', threads, ramBytes, async () => {
        const d = await scanDirty(fd, pages, table, null, threads);
        if (d.length !== 0) throw new Error(`expected 0 dirty, got ${d.length}`);
      });
    }
    await measureScanCopy(fd, table, makeDirty);
    await measureDirtyScans(fd, table, dirty, makeDirty);
  } finally {
    closeSync(fd);
    unlinkSync(path);
  }
  writeResults();
}

/** Fill every page with random, page-distinct content. */
function populate(fd: number): void {
  const chunk = Buffer.alloc(2 * MIB);
  randomFillSync(chunk);
  for (let off = 0; off < ramBytes; off += chunk.length) {
    for (let p = 0; p < chunk.length; p += PAGE_SIZE) chunk.writeUInt32LE((off + p) / PAGE_SIZE, p);
    writeSync(fd, chunk, 0, chunk.length, off);
  }
  ftruncateSync(fd, ramBytes);
}

/**
 * What a checkpoint's collect does: one pass that hashes and copies the dirty pages,
 * reading through pread, and through the tracker's mapping of the file (mapRam).
 */
async function measureScanCopy(fd: number, table: Buffer, makeDirty: () => void): Promise<void> {
  const map = mapRam(fd, pages);
  try {
    for (const [how, m] of [
      ['pread', null],
      ['mapped', map],
    ] as const) {
      for (const threads of [1, 2]) {
        await measure(
          `scanCopy ${how}, ${dirtyMiB} MiB dirty`,
          threads,
          ramBytes,
          async () => {
            const d = await scanCopy(fd, pages, table, null, threads, m);
            if (d.pfns.length !== dirtyPages) throw new Error(`expected ${dirtyPages} dirty, got ${d.pfns.length}`);
          },
          makeDirty,
        );
      }
    }
  } finally {
    if (map) unmapRam(map);
  }
}

/** scanDirty over the whole file and over the candidates only (the soft-dirty path), and reading the dirty set. */
async function measureDirtyScans(fd: number, table: Buffer, dirty: Uint32Array, makeDirty: () => void): Promise<void> {
  for (const threads of [1, 2]) {
    await measure(
      `scanDirty full, ${dirtyMiB} MiB dirty`,
      threads,
      ramBytes,
      async () => {
        const d = await scanDirty(fd, pages, table, null, threads);
        if (d.length !== dirtyPages) throw new Error(`expected ${dirtyPages} dirty, got ${d.length}`);
      },
      makeDirty,
    );
  }
  for (const threads of [1, 2]) {
    await measure(
      `scanDirty candidates, ${dirtyMiB} MiB`,
      threads,
      dirtyPages * PAGE_SIZE,
      async () => {
        const d = await scanDirty(fd, pages, table, dirty, threads);
        if (d.length !== dirtyPages) throw new Error(`expected ${dirtyPages} dirty, got ${d.length}`);
      },
      makeDirty,
      'soft-dirty path: only the candidate pages are read',
    );
  }
  const out = Buffer.allocUnsafe(dirtyPages * PAGE_SIZE);
  const mask = new Uint8Array(dirtyPages);
  await measure(`readPages + zeroMask, ${dirtyMiB} MiB`, 1, dirtyPages * PAGE_SIZE, () => {
    readPages(fd, dirty, out);
    zeroMask(out, mask);
  });
}

function writeResults(): void {
  const dir = join(process.cwd(), 'bench-results');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, 'scan.json');
  writeFileSync(
    file,
    JSON.stringify(
      {
        bench: 'scan',
        date: new Date().toISOString(),
        host: { cpus: cpus().length, cpuModel: cpus()[0]?.model, kernel: release(), node: process.version },
        ramBytes,
        dirtyBytes: dirtyPages * PAGE_SIZE,
        runs,
        results: rows,
      },
      null,
      2,
    ) + '\n',
  );
  console.log(`wrote ${file}`);
}

await main();
