/**
 * Disk benchmark: `npm run bench disk [-- --mib 256 --count 20000]`
 *
 * `qemu-img bench` (QEMU's own block layer, the code a guest's virtio-blk requests go
 * through) against the same raw file twice in one run: opened directly, and through
 * the sidecar's NBD server (FileBlockDevice pass-through) on a unix socket. 4 KiB
 * requests: sequential, and "random" — qemu-img bench has no random mode, so the step
 * is a large odd multiple of 4 KiB and offsets wrap around the image, which scatters
 * them over the whole file. Queue depth 1 gives latency (run time / count); depth 16
 * gives throughput. Writes are not flushed (guest cache semantics); the file opened
 * directly uses cache=writeback like the sidecar's buffered I/O.
 *
 * Prints each figure beside its target and writes bench-results/disk.json. Run it under
 * the machine-wide lock: flock /tmp/tether-qemu.lock npm run bench disk
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { FileBlockDevice } from '../../src/disk/file-device.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { nullLogger } from '../../src/util/log.ts';
import { arg } from './args.ts';

const run = promisify(execFile);

const MiB = 1024 * 1024;
const sizeMiB = arg('mib', 256);
const count = arg('count', 20000);
const BS = 4096;
/** 997 x 4 KiB: odd, so offsets visit every 4 KiB block before repeating. */
const RANDOM_STEP = 997 * BS;

interface Case {
  name: string;
  write: boolean;
  step: number;
  depth: number;
}

const CASES: Case[] = [
  { name: 'seq read 4k qd1', write: false, step: BS, depth: 1 },
  { name: 'seq write 4k qd1', write: true, step: BS, depth: 1 },
  { name: 'rand read 4k qd1', write: false, step: RANDOM_STEP, depth: 1 },
  { name: 'rand write 4k qd1', write: true, step: RANDOM_STEP, depth: 1 },
  { name: 'rand read 4k qd16', write: false, step: RANDOM_STEP, depth: 16 },
  { name: 'rand write 4k qd16', write: true, step: RANDOM_STEP, depth: 16 },
];

/** Through the sidecar relative to the file opened directly (the target for journal writes). */
const TARGET_RATIO = 0.5;

async function bench(target: string, c: Case): Promise<{ seconds: number; iops: number; mibps: number; latencyUs: number }> {
  const args = [
    'bench',
    '-f',
    'raw',
    '-t',
    'writeback',
    '-c',
    String(count),
    '-d',
    String(c.depth),
    '-s',
    String(BS),
    '-S',
    String(c.step),
  ];
  if (c.write) args.push('-w', '--pattern=90');
  const { stdout } = await run('qemu-img', [...args, target]);
  const m = /Run completed in ([\d.]+) seconds/.exec(stdout);
  if (!m) throw new Error(`unexpected qemu-img bench output: ${stdout}`);
  const seconds = Number(m[1]);
  const iops = count / seconds;
  return { seconds, iops, mibps: (iops * BS) / MiB, latencyUs: c.depth === 1 ? (seconds / count) * 1e6 : NaN };
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-bench-disk-'));
  const image = path.join(dir, 'disk.img');
  // Fully written (not sparse), so reads hit data, as on a used disk.
  fs.writeFileSync(image, Buffer.alloc(sizeMiB * MiB, 1));
  const dev = await FileBlockDevice.open(image);
  const sock = path.join(dir, 'nbd.sock');
  const server = new NbdServer({ device: dev, exportName: 'bench', log: nullLogger });
  await server.listen(sock);
  const targets = [
    { column: 'file', target: image },
    { column: 'nbd pass-through', target: `nbd+unix:///bench?socket=${sock}` },
  ];
  const rows: Record<string, unknown>[] = [];
  try {
    console.log(`qemu-img bench, ${sizeMiB} MiB image, ${count} requests of 4 KiB per run; target: sidecar >= ${TARGET_RATIO}x file`);
    console.log(
      `${'case'.padEnd(20)} ${'file IOPS'.padStart(10)} ${'nbd IOPS'.padStart(10)} ${'ratio'.padStart(6)} ${'file lat'.padStart(9)} ${'nbd lat'.padStart(9)}  target`,
    );
    for (const c of CASES) {
      const res: Record<string, Awaited<ReturnType<typeof bench>>> = {};
      for (const t of targets) res[t.column] = await bench(t.target, c);
      const f = res['file']!;
      const n = res['nbd pass-through']!;
      const ratio = n.iops / f.iops;
      const lat = (x: number) => (Number.isNaN(x) ? '-' : `${x.toFixed(0)}us`);
      console.log(
        `${c.name.padEnd(20)} ${f.iops.toFixed(0).padStart(10)} ${n.iops.toFixed(0).padStart(10)} ${ratio.toFixed(2).padStart(6)} ${lat(f.latencyUs).padStart(9)} ${lat(n.latencyUs).padStart(9)}  ${ratio >= TARGET_RATIO ? 'ok' : 'BELOW'} (>= ${TARGET_RATIO})`,
      );
      rows.push({ case: c, results: res, ratio, targetRatio: TARGET_RATIO });
    }
  } finally {
    await server.close();
    await dev.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const out = path.join(process.cwd(), 'bench-results');
  fs.mkdirSync(out, { recursive: true });
  const file = path.join(out, 'disk.json');
  fs.writeFileSync(
    file,
    JSON.stringify(
      {
        bench: 'disk',
        date: new Date().toISOString(),
        host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, kernel: os.release(), node: process.version },
        imageMiB: sizeMiB,
        requestsPerRun: count,
        requestBytes: BS,
        results: rows,
      },
      null,
      2,
    ) + '\n',
  );
  console.log(`wrote ${file}`);
}

await main();
