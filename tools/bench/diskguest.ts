/**
 * In-guest disk benchmark: `npm run bench diskguest [-- --ops 2000 --span-mib 64 | --quick]`
 *
 * Two parts, each in its own two-namespace Cluster (netns-tests/harness.ts), under real
 * QEMU (TCG) with the tether guest image:
 *
 * 1. diskbench (tools/guest/diskbench.c) in the guest: 4 KiB O_DIRECT seq/rand write/read
 *    at queue depth 1 (latency) and rand at depth 16 (throughput) on /dev/vda, twice in
 *    the same run: the disk served by the sidecar's NBD server (the production launcher:
 *    QEMU's NBD client under virtio-blk-pci), and QEMU opening the same raw image file
 *    itself (harness `disk.direct`: a file blockdev under the same virtio-blk-pci).
 * 2. Checkpoint bytes per MB of guest writes: diskcheck writes 4 KiB records with O_DIRECT
 *    while the VM migrates (completing). The destination's 'checkpoint sent' log records
 *    carry each checkpoint's DISK payload and extent count and the bytes the guest had
 *    written through the journal up to that barrier; the checkpoint cost is payload +
 *    one DISK frame (header + epoch + offset + MAC) per extent.
 *
 * Prints figures beside targets and writes bench-results/diskguest.json and .md. TCG makes
 * the guest slow: the ratios are the finding, not the absolute IOPS. Run it under the
 * machine-wide lock: flock /tmp/tether-qemu.lock npm run bench diskguest
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { HEADER_SIZE, MAC_SIZE } from '../../src/checkpoint/codec.ts';
import { Cluster, diskbench, waitDiskPasses, waitFor, type DiskbenchCase } from '../../netns-tests/harness.ts';
import { arg } from './args.ts';
import { markdownTable, type Figure } from './report.ts';

const quick = process.argv.includes('--quick');
const ops = arg('ops', quick ? 400 : 2000);
const spanMiB = arg('span-mib', quick ? 16 : 64);
const only = process.argv.includes('--only') ? process.argv[process.argv.indexOf('--only') + 1]!.split(',') : ['guest', 'ckpt'];
const DISK_OVERHEAD = HEADER_SIZE + 16 + MAC_SIZE;
const MB = 1e6;

type Rec = Record<string, any>;

function records(file: string): Rec[] {
  let text = '';
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const out: Rec[] = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      out.push(JSON.parse(line) as Rec);
    } catch {
      /* a partial last line */
    }
  }
  return out;
}

async function guestRun(direct: boolean): Promise<DiskbenchCase[]> {
  const c = new Cluster({ disk: { guest: 'diskbench', direct, mib: spanMiB + 16, benchSpanMiB: spanMiB, benchOps: ops } });
  try {
    await c.up();
    const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
    if (r.code !== 0) throw new Error(`vm start: ${r.stderr}`);
    const log = c.serialLog(c.src);
    await waitFor(() => diskbench(log).done || diskbench(log).error !== undefined, `diskbench done (${log})`, 600_000);
    const rep = diskbench(log);
    if (rep.error) throw new Error(rep.error);
    return rep.cases;
  } finally {
    await c.cleanup();
  }
}

interface Ckpt {
  checkpoints: number;
  diskBytes: number;
  diskExtents: number;
  guestDiskBytes: number;
  ckptBytesPerMB: number;
  outcome: string;
}

async function ckptRun(): Promise<Ckpt> {
  const c = new Cluster({ disk: { guest: 'diskcheck' } });
  try {
    await c.up();
    const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
    if (r.code !== 0) throw new Error(`vm start: ${r.stderr}`);
    await waitDiskPasses(c.serialLog(c.src), 0, 2, 'on the source before migrating');
    const mig = await c.migrate();
    const sent = records(c.dst.daemonLog).filter((x) => x.msg === 'checkpoint sent' && typeof x.diskBytes === 'number');
    const diskBytes = sent.reduce((n, x) => n + x.diskBytes, 0);
    const diskExtents = sent.reduce((n, x) => n + x.diskExtents, 0);
    const guestDiskBytes = Math.max(0, ...sent.map((x) => x.guestDiskBytes as number));
    return {
      checkpoints: sent.length,
      diskBytes,
      diskExtents,
      guestDiskBytes,
      ckptBytesPerMB: guestDiskBytes > 0 ? (diskBytes + diskExtents * DISK_OVERHEAD) / (guestDiskBytes / MB) : NaN,
      outcome: String(mig.result?.outcome ?? `exit ${mig.code}`),
    };
  } finally {
    await c.cleanup();
  }
}

const figures: Figure[] = [];
const result: Rec = {
  bench: 'diskguest',
  date: new Date().toISOString(),
  host: { cpus: os.cpus().length, kernel: os.release() },
  quick,
  ops,
  spanMiB,
};
if (only.includes('guest')) {
  const nbd = await guestRun(false);
  const file = await guestRun(true);
  result.guest = { nbd, file };
  console.log(`diskbench in the guest (TCG), 4 KiB O_DIRECT, ${ops} requests per case over ${spanMiB} MiB`);
  console.log(
    `${'case'.padEnd(16)} ${'file IOPS'.padStart(9)} ${'nbd IOPS'.padStart(9)} ${'nbd/file'.padStart(8)}  lat mean/p99 file    nbd`,
  );
  for (const f of file) {
    const n = nbd.find((x) => x.case === f.case && x.qd === f.qd);
    if (!n) continue;
    const name = `${f.case} qd${f.qd}`;
    console.log(
      `${name.padEnd(16)} ${String(f.iops).padStart(9)} ${String(n.iops).padStart(9)} ${(n.iops / f.iops).toFixed(2).padStart(8)}  ${`${f.latMeanUs}/${f.latP99Us}`.padStart(13)} ${`${n.latMeanUs}/${n.latP99Us}`.padStart(9)} us`,
    );
    figures.push({
      name: `guest ${name} NBD pass-through / file`,
      value: n.iops / f.iops,
      unit: 'x',
      note: `${n.iops} vs ${f.iops} IOPS; latency mean ${n.latMeanUs} vs ${f.latMeanUs} µs, p99 ${n.latP99Us} vs ${f.latP99Us} µs`,
    });
  }
}
if (only.includes('ckpt')) {
  const k = await ckptRun();
  result.ckpt = k;
  console.log(
    `\nmigration (${k.outcome}) with diskcheck writing: ${k.checkpoints} checkpoints, ${(k.guestDiskBytes / MB).toFixed(2)} MB written by the guest through the journal, ${(k.diskBytes / MB).toFixed(2)} MB DISK payload in ${k.diskExtents} extents`,
  );
  figures.push({
    name: 'checkpoint bytes per MB of guest writes',
    value: k.ckptBytesPerMB / 1e3,
    unit: 'kB',
    note: `${k.checkpoints} checkpoints; payload + ${DISK_OVERHEAD} B per extent; overwrites within an epoch are sent once`,
  });
}
const table = markdownTable(figures);
console.log('\n' + table);
result.figures = figures;
fs.mkdirSync('bench-results', { recursive: true });
fs.writeFileSync(path.join('bench-results', 'diskguest.json'), JSON.stringify(result, null, 2) + '\n');
fs.writeFileSync(
  path.join('bench-results', 'diskguest.md'),
  `# diskguest bench (${result.date})\n\n\`npm run bench diskguest${quick ? ' -- --quick' : ''}\`\n\n${table}\n`,
);
console.log('wrote bench-results/diskguest.json and diskguest.md');
