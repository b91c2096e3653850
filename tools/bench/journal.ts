/**
 * Block-write journal benchmark: `npm run bench journal [-- --mib 128 --depth 16 --epoch-mib 8]`
 *
 * At the BlockDevice interface (what the NBD server calls), in one process:
 *   raw        FileBlockDevice on a raw image file (pass-through)
 *   journaled  BlockJournal in journal mode over the same file: every `epoch-mib` MiB of
 *              writes the epoch is sealed and released (the barrier's D-side work; the
 *              source's apply runs on another host and is not timed here)
 * for sequential 64 KiB writes and random 4 KiB writes, `depth` requests in flight (as
 * QEMU pipelines them). The raw runs end with a FLUSH (fdatasync), as a guest's sync would;
 * journaled FLUSH completes at once. Also: checkpoint bytes added per MB of guest writes
 * (DISK payload + frame header + MAC, per sealed extent). Target: journaled ≥ 0.5× raw.
 * Prints a table and writes bench-results/journal.json.
 */
import { mkdirSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { cpus, release } from 'node:os';
import { HEADER_SIZE, MAC_SIZE } from '../../src/peer/codec.ts';
import type { BlockDevice } from '../../src/disk/block-device.ts';
import { FileBlockDevice } from '../../src/disk/file-device.ts';
import { BlockJournal } from '../../src/disk/journal.ts';
import { arg } from './args.ts';

const MIB = 1024 * 1024;
const totalMiB = arg('mib', 128);
const depth = arg('depth', 16);
const epochMiB = arg('epoch-mib', 8);
const imageBytes = 2 * totalMiB * MIB;
const path = `/tmp/tether-bench-journal-${process.pid}.img`;
/** DISK frame: header + epoch u64 + offset u64 + data + MAC. */
const DISK_OVERHEAD = HEADER_SIZE + 16 + MAC_SIZE;

interface Row {
  workload: string;
  device: 'raw' | 'journaled';
  mibPerS: number;
  iops: number;
  /** Checkpoint bytes per MiB of guest writes (journaled only). */
  ckptBytesPerMiB: number | null;
}

function offsets(kind: 'seq' | 'rand', size: number, count: number): number[] {
  const out: number[] = [];
  let x = 0x9e3779b9;
  for (let i = 0; i < count; i++) {
    if (kind === 'seq') out.push(i * size);
    else {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      out.push(((x >>> 0) % (imageBytes / size)) * size);
    }
  }
  return out;
}

async function run(kind: 'seq' | 'rand', size: number, journaled: boolean): Promise<Row> {
  writeFileSync(path, '');
  truncateSync(path, imageBytes);
  const file = await FileBlockDevice.open(path);
  const journal = journaled ? new BlockJournal(file, { maxBytes: 4 * epochMiB * MIB }) : undefined;
  journal?.journal(1);
  const dev: BlockDevice = journal ?? file;
  const count = (totalMiB * MIB) / size;
  const offs = offsets(kind, size, count);
  const data = Buffer.alloc(size, 0xa5);
  const perEpoch = Math.max(1, (epochMiB * MIB) / size);
  let epoch = 1;
  let ckptBytes = 0;
  let next = 0;
  const t0 = process.hrtime.bigint();
  const worker = async (): Promise<void> => {
    while (next < count) {
      const i = next++;
      await dev.write(offs[i]!, data);
      if (journal && (i + 1) % perEpoch === 0) {
        // The barrier: (VM stopped) seal, then the ACK releases the epoch.
        const ext = await journal.seal(epoch);
        for (const e of ext) ckptBytes += (e.zero ? 8 : e.data.length) + DISK_OVERHEAD;
        journal.release(epoch++);
      }
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
  await dev.flush();
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (journal) {
    const ext = await journal.seal(epoch);
    for (const e of ext) ckptBytes += (e.zero ? 8 : e.data.length) + DISK_OVERHEAD;
  }
  await dev.close();
  rmSync(path, { force: true });
  return {
    workload: `${kind} ${size / 1024} KiB`,
    device: journaled ? 'journaled' : 'raw',
    mibPerS: +(totalMiB / s).toFixed(1),
    iops: Math.round(count / s),
    ckptBytesPerMiB: journaled ? Math.round(ckptBytes / totalMiB) : null,
  };
}

const rows: Row[] = [];
for (const [kind, size] of [
  ['seq', 64 * 1024],
  ['rand', 4096],
] as const) {
  rows.push(await run(kind, size, false));
  rows.push(await run(kind, size, true));
}
console.log(`journal bench: ${totalMiB} MiB per run, depth ${depth}, epoch every ${epochMiB} MiB`);
console.log('workload      device      MiB/s     IOPS   ckpt bytes / MiB written   vs raw (target >= 0.5x)');
for (let i = 0; i < rows.length; i += 2) {
  const raw = rows[i]!;
  const j = rows[i + 1]!;
  for (const r of [raw, j]) {
    console.log(
      `${r.workload.padEnd(13)} ${r.device.padEnd(10)} ${String(r.mibPerS).padStart(7)} ${String(r.iops).padStart(8)}   ${String(r.ckptBytesPerMiB ?? '-').padStart(24)}   ${r === j ? `${(j.mibPerS / raw.mibPerS).toFixed(2)}x` : ''}`,
    );
  }
}
mkdirSync('bench-results', { recursive: true });
writeFileSync(
  'bench-results/journal.json',
  JSON.stringify(
    { bench: 'journal', date: new Date().toISOString(), host: { cpus: cpus().length, kernel: release() }, totalMiB, depth, epochMiB, rows },
    null,
    2,
  ) + '\n',
);
