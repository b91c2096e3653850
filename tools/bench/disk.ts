/**
 * Disk benchmark: `npm run bench disk [-- --mib 256 --count 20000 --cases read | --quick]`
 *
 * `qemu-img bench` (QEMU's own block layer, the code a guest's virtio-blk requests go
 * through) against the same raw file three ways in one run:
 *   file         QEMU opens the raw file directly (cache=writeback, aio=threads)
 *   pass-through the sidecar's NbdServer over FileBlockDevice on a unix socket
 *                (nbd+unix://): no longer a VM's normal life (that is QEMU's own file
 *                node, docs/disk.md), only D's disk between the journal's write-back and
 *                the switch to the file node; kept as the NBD server's own cost
 *   journaled    the same NbdServer over the production BlockJournal in journal mode,
 *                exactly as the destination serves the disk during post-copy
 *                (src/migrate/destination.ts): writes are kept per epoch, reads see
 *                them over the image. A barrier every `--epoch-ms` seals the open
 *                epoch and releases it (the source's apply runs on the other host and
 *                is not timed); its DISK extents give the checkpoint bytes added per
 *                MiB written.
 *   journaled+wal the same with the write-ahead log (src/disk/journal-log.ts), as the
 *                destination runs it: every write is appended to the log before its
 *                reply (FLUSH/FUA: after fdatasync). The log lives in `--wal-dir`
 *                (default: a directory next to the image, i.e. under os.tmpdir()).
 * Settings: 4 KiB at queue depth 1 (latency = run time / count) and 16 (throughput),
 * sequential and "random" (qemu-img bench has no random mode: the step is an odd
 * multiple of 4 KiB, 997 blocks, and offsets wrap around the image, which scatters them
 * over the whole file), and 64 KiB sequential at depth 16. Writes are not flushed
 * (guest cache semantics). Runs of the three columns alternate, so host noise hits all.
 *
 * Target (issues 7 and 16): journaled writes, with and without the log, >= 0.5x the file. Prints a table and writes
 * bench-results/disk.json and disk.md. `--quick` (CI smoke, < 40 s): 64 MiB, 2000
 * requests per run. Run it under the machine-wide lock:
 *   flock /tmp/tether-qemu.lock npm run bench disk
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { HEADER_SIZE, MAC_SIZE } from '../../src/peer/codec.ts';
import { FileBlockDevice } from '../../src/disk/file-device.ts';
import { BlockJournal } from '../../src/disk/journal.ts';
import { JournalLog } from '../../src/disk/journal-log.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { nullLogger } from '../../src/util/log.ts';
import { arg, str } from './args.ts';
import { markdownTable, verdict, type Figure } from './report.ts';

const run = promisify(execFile);

const MiB = 1024 * 1024;
const quick = process.argv.includes('--quick');
const sizeMiB = arg('mib', quick ? 64 : 256);
const count = arg('count', quick ? 2000 : 20000);
const epochMs = arg('epoch-ms', 100);
/** The production default of disk.journalMaxBytes. */
const journalMaxBytes = arg('journal-mib', 256) * MiB;
const KiB4 = 4096;
/** 997 x 4 KiB: odd, so offsets visit every 4 KiB block before repeating. */
const RANDOM_STEP = 997 * KiB4;
/** A DISK message in a checkpoint: frame header + epoch u64 + offset u64 + data + MAC. */
const DISK_OVERHEAD = HEADER_SIZE + 16 + MAC_SIZE;
/** Through the sidecar relative to the file opened directly (the issue's target for journal writes). */
const TARGET_RATIO = 0.5;

interface Case {
  name: string;
  write: boolean;
  size: number;
  step: number;
  depth: number;
  count: number;
}

const CASES: Case[] = [
  { name: 'seq read 4k qd1', write: false, size: KiB4, step: KiB4, depth: 1, count },
  { name: 'seq write 4k qd1', write: true, size: KiB4, step: KiB4, depth: 1, count },
  { name: 'rand read 4k qd1', write: false, size: KiB4, step: RANDOM_STEP, depth: 1, count },
  { name: 'rand write 4k qd1', write: true, size: KiB4, step: RANDOM_STEP, depth: 1, count },
  { name: 'rand read 4k qd16', write: false, size: KiB4, step: RANDOM_STEP, depth: 16, count },
  { name: 'rand write 4k qd16', write: true, size: KiB4, step: RANDOM_STEP, depth: 16, count },
  { name: 'seq read 64k qd16', write: false, size: 16 * KiB4, step: 16 * KiB4, depth: 16, count: Math.ceil(count / 4) },
  { name: 'seq write 64k qd16', write: true, size: 16 * KiB4, step: 16 * KiB4, depth: 16, count: Math.ceil(count / 4) },
];

/** `--cases read`: only the cases whose name contains it (a short run of one part). */
const casesArg = str('cases', '');
const SELECTED = casesArg ? CASES.filter((c) => c.name.includes(casesArg)) : CASES;

type Column = 'file' | 'pass-through' | 'journaled' | 'journaled+wal';
const COLUMNS: Column[] = ['file', 'pass-through', 'journaled', 'journaled+wal'];
const walDirArg = str('wal-dir', '') || undefined;

interface Result {
  seconds: number;
  iops: number;
  mibps: number;
  /** Mean request latency at queue depth 1 (run time / count), µs. */
  latencyUs: number | null;
}

async function bench(target: string, c: Case): Promise<Result> {
  const args = [
    'bench',
    '-f',
    'raw',
    '-t',
    'writeback',
    '-c',
    String(c.count),
    '-d',
    String(c.depth),
    '-s',
    String(c.size),
    '-S',
    String(c.step),
  ];
  if (c.write) args.push('-w', '--pattern=90');
  const { stdout } = await run('qemu-img', [...args, target]);
  const m = /Run completed in ([\d.]+) seconds/.exec(stdout);
  if (!m) throw new Error(`unexpected qemu-img bench output: ${stdout}`);
  const seconds = Number(m[1]);
  const iops = c.count / seconds;
  return { seconds, iops, mibps: (iops * c.size) / MiB, latencyUs: c.depth === 1 ? (seconds / c.count) * 1e6 : null };
}

/** The three NBD exports qemu-img bench runs against, beside the file itself. */
interface Rig {
  dir: string;
  image: string;
  passDev: FileBlockDevice;
  passServer: NbdServer;
  journal: BlockJournal;
  jServer: NbdServer;
  wal: JournalLog;
  walDir: string;
  wJournal: BlockJournal;
  wServer: NbdServer;
  targets: Record<Column, string>;
}

/** What the journal's checkpoints carried: bytes (with framing), extents, epochs sealed. */
interface Sealed {
  epoch: number;
  wEpoch: number;
  ckptBytes: number;
  extents: number;
}

async function openRig(): Promise<Rig> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-bench-disk-'));
  const image = path.join(dir, 'disk.img');
  // Fully written (not sparse), so reads hit data, as on a used disk.
  fs.writeFileSync(image, Buffer.alloc(sizeMiB * MiB, 1));

  // pass-through: the NBD server alone (D's disk between write-back and the switch)
  const passDev = await FileBlockDevice.open(image);
  const passServer = new NbdServer({ device: passDev, exportName: 'bench', log: nullLogger });
  await passServer.listen(path.join(dir, 'pass.sock'));
  // journaled: what Destination#journalDisk serves during post-copy
  const jImage = await FileBlockDevice.open(image);
  const journal = new BlockJournal(jImage, { maxBytes: journalMaxBytes, log: nullLogger });
  journal.journal(1);
  const jServer = new NbdServer({ device: journal, exportName: 'bench', log: nullLogger });
  await jServer.listen(path.join(dir, 'journal.sock'));
  // journaled+wal: the same, with the write-ahead log the destination keeps
  const walDir = walDirArg ? fs.mkdtempSync(path.join(walDirArg, 'tether-bench-wal-')) : path.join(dir, 'wal');
  const wal = await JournalLog.create(path.join(walDir, 'bench.m.wal'), { vm: 'bench', migrationId: 'm', size: sizeMiB * MiB });
  const wImage = await FileBlockDevice.open(image);
  const wJournal = new BlockJournal(wImage, { maxBytes: journalMaxBytes, log: nullLogger, wal });
  wJournal.journal(1);
  const wServer = new NbdServer({ device: wJournal, exportName: 'bench', log: nullLogger });
  await wServer.listen(path.join(dir, 'wal.sock'));
  const targets: Record<Column, string> = {
    file: image,
    'pass-through': `nbd+unix:///bench?socket=${path.join(dir, 'pass.sock')}`,
    journaled: `nbd+unix:///bench?socket=${path.join(dir, 'journal.sock')}`,
    'journaled+wal': `nbd+unix:///bench?socket=${path.join(dir, 'wal.sock')}`,
  };
  return { dir, image, passDev, passServer, journal, jServer, wal, walDir, wJournal, wServer, targets };
}

/** The destination's barrier every epochMs: quiesce + stop, seal(k) into checkpoint k, ACK(k) -> release(k). */
function startBarrier(r: Rig, sealed: Sealed): NodeJS.Timeout {
  return setInterval(() => {
    r.journal.quiesce();
    void r.journal.seal(sealed.epoch).then((ext) => {
      for (const e of ext) sealed.ckptBytes += (e.zero ? 8 : e.data.length) + DISK_OVERHEAD;
      sealed.extents += ext.length;
      r.journal.release(sealed.epoch++);
    });
    r.wJournal.quiesce();
    void r.wJournal.seal(sealed.wEpoch).then(() => r.wJournal.release(sealed.wEpoch++));
  }, epochMs);
}

/** Seal what is left, then close the servers, journals and WAL and remove the files. */
async function closeRig(r: Rig, sealed: Sealed): Promise<void> {
  const ext = await r.journal.seal(sealed.epoch);
  for (const e of ext) sealed.ckptBytes += (e.zero ? 8 : e.data.length) + DISK_OVERHEAD;
  sealed.extents += ext.length;
  await r.jServer.close();
  await r.wServer.close();
  await r.passServer.close();
  await r.journal.close();
  await r.wJournal.close();
  await r.wal.remove();
  if (walDirArg) fs.rmSync(r.walDir, { recursive: true, force: true });
  await r.passDev.close();
  fs.rmSync(r.dir, { recursive: true, force: true });
}

type Rows = { case: Case; results: Record<Column, Result> }[];

/** Every selected case against every column, printed as it goes. */
async function runCases(targets: Record<Column, string>, rows: Rows): Promise<number> {
  let writtenThroughJournal = 0;
  console.log(
    `qemu-img bench, ${sizeMiB} MiB image, ${count} requests per 4 KiB run (a quarter for 64 KiB); journal barrier every ${epochMs} ms`,
  );
  console.log(
    `${'case'.padEnd(19)} ${'file IOPS'.padStart(9)} ${'pass IOPS'.padStart(9)} ${'jrnl IOPS'.padStart(9)} ${'wal IOPS'.padStart(9)}  ${'pass/file'.padStart(9)} ${'jrnl/file'.padStart(9)} ${'wal/file'.padStart(9)}  ${'lat file/pass/jrnl/wal'.padStart(24)}`,
  );
  for (const c of SELECTED) {
    const res = {} as Record<Column, Result>;
    for (const col of COLUMNS) res[col] = await bench(targets[col], c);
    if (c.write) writtenThroughJournal += c.count * c.size;
    const lat = COLUMNS.map((col) => (res[col].latencyUs === null ? '-' : res[col].latencyUs!.toFixed(0))).join('/');
    const pr = res['pass-through'].iops / res.file.iops;
    const jr = res.journaled.iops / res.file.iops;
    const wr = res['journaled+wal'].iops / res.file.iops;
    console.log(
      `${c.name.padEnd(19)} ${res.file.iops.toFixed(0).padStart(9)} ${res['pass-through'].iops.toFixed(0).padStart(9)} ${res.journaled.iops.toFixed(0).padStart(9)} ${res['journaled+wal'].iops.toFixed(0).padStart(9)}  ${pr.toFixed(2).padStart(9)} ${jr.toFixed(2).padStart(9)} ${wr.toFixed(2).padStart(9)}  ${(lat + (c.depth === 1 ? ' us' : '')).padStart(24)}`,
    );
    rows.push({ case: c, results: res });
  }
  return writtenThroughJournal;
}

async function main(): Promise<void> {
  const rig = await openRig();
  const sealed: Sealed = { epoch: 1, wEpoch: 1, ckptBytes: 0, extents: 0 };
  const barrier = startBarrier(rig, sealed);
  const rows: Rows = [];
  let writtenThroughJournal = 0;
  try {
    writtenThroughJournal = await runCases(rig.targets, rows);
  } finally {
    clearInterval(barrier);
    await closeRig(rig, sealed);
  }
  const perMiB = sealed.ckptBytes / (writtenThroughJournal / MiB);
  const figures = diskFigures(rows, sealed, perMiB);
  const table = markdownTable(figures);
  console.log('\n' + table);
  const misses = figures.filter((f) => verdict(f) === 'MISS').length;
  console.log(`\njournaled writes >= ${TARGET_RATIO}x file: ${misses === 0 ? 'PASS' : `MISS (${misses})`}`);
  writeResults(rows, figures, table, perMiB);
}

function diskFigures(rows: Rows, sealed: Sealed, perMiB: number): Figure[] {
  const figures: Figure[] = [];
  for (const r of rows) {
    const f = r.results.file;
    for (const col of ['journaled', 'journaled+wal', 'pass-through'] as const) {
      const x = r.results[col];
      figures.push({
        name: `${r.case.name} ${col} / file`,
        value: x.iops / f.iops,
        unit: 'x',
        ...(r.case.write && col !== 'pass-through' ? { target: { op: '>=' as const, value: TARGET_RATIO } } : {}),
        note: `${x.iops.toFixed(0)} vs ${f.iops.toFixed(0)} IOPS${x.latencyUs !== null ? `, ${x.latencyUs.toFixed(0)} vs ${f.latencyUs!.toFixed(0)} µs` : ''}`,
      });
    }
  }
  figures.push({
    name: 'checkpoint bytes per MiB written (qemu-img through the journal)',
    value: perMiB / 1024,
    unit: 'KiB',
    note: `${sealed.extents} DISK extents over ${sealed.epoch} epochs; random 4 KiB writes cost ${DISK_OVERHEAD} B of framing each`,
  });
  return figures;
}

function writeResults(rows: Rows, figures: Figure[], table: string, perMiB: number): void {
  const out = path.join(process.cwd(), 'bench-results');
  fs.mkdirSync(out, { recursive: true });
  const meta = {
    bench: 'disk',
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, kernel: os.release(), node: process.version, load: os.loadavg() },
    quick,
    imageMiB: sizeMiB,
    requestsPerRun: count,
    epochMs,
    journalMaxBytes,
    walDir: walDirArg ?? 'os.tmpdir()',
  };
  fs.writeFileSync(
    path.join(out, 'disk.json'),
    JSON.stringify({ ...meta, results: rows, checkpointBytesPerMiB: perMiB, figures }, null, 2) + '\n',
  );
  fs.writeFileSync(
    path.join(out, 'disk.md'),
    `# disk bench (${meta.date})\n\n\`npm run bench disk${quick ? ' -- --quick' : ''}\`, ${sizeMiB} MiB image, ${count} requests per run\n\n${table}\n`,
  );
  console.log(`wrote ${path.join(out, 'disk.json')} and disk.md`);
}

await main();
