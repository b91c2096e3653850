/**
 * One vanilla QEMU migration of the suite's grid cell (512 MiB, memcheck over 25 % at 64 MB/s,
 * migration link shaped with tbf), then the destination guest watched for a panic and for
 * memcheck passes. Made to find why vanilla pre-copy guests died on the destination: QEMU 7.2
 * loses TCG dirty bits when the RAM block is a multiple of 256 KiB (PRECOPY_NOTE in suite.ts);
 * `--odd-size` gives the guest 8 KiB more RAM, as the suite does, and the guest survives.
 * Run under the lock (one run, ~2 minutes):
 *   flock /tmp/tether-qemu.lock npx tsx tools/bench/precopy-repro.ts [options]
 *   --ram 512  --workload mc25|idle  --link 1gbit|200mbit|none  --rate 64 (memcheck MB/s)
 *   --postcopy  --odd-size  --caps a,b (extra migration capabilities set on both sides)
 *   --watch-s 20   seconds to watch the destination after completion
 * Exit status 0: the destination guest survived; 2: it panicked or memcheck saw corruption.
 */
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../lab/cluster.ts';
import { memcheck, waitPasses } from '../../lab/serial.ts';
import { waitFor } from '../../lab/proc.ts';
import { loadVmConfig } from '../../src/config/load.ts';
import { killVanilla, LINKS, log, MiB, shapeLink, startVanillaQemu, type Link, type Rec, type VQemu } from './lib.ts';
import { num, str } from './args.ts';

const ramMiB = num('ram', 512);
const workload = str('workload', 'mc25');
const link = str('link', '1gbit');
if (link !== 'none' && !(link in LINKS)) throw new Error(`--link must be none or one of ${Object.keys(LINKS).join(', ')}`);
const postcopy = process.argv.includes('--postcopy');
const rate = num('rate', 64);
const watchS = num('watch-s', 20);
const extraCaps = str('caps', '')
  .split(',')
  .filter((s) => s !== '');
const oddSize = process.argv.includes('--odd-size');

const c = new Cluster({
  vm: {
    memcheckMiB: workload === 'mc25' ? ramMiB / 4 : 16,
    memcheckMBps: rate,
    memoryMiB: ramMiB,
    maxBandwidth: 10 * 1024 * MiB,
    ...(workload === 'idle' ? { appendExtra: 'tether.run=sleep:1000000' } : {}),
  },
});
let src: VQemu | undefined;
let dst: VQemu | undefined;
let code = 1;
try {
  await c.up();
  if (link !== 'none') shapeLink(c, link as Link);
  const vm = loadVmConfig(c.vmConfig);
  // --odd-size: RAM 8 KiB (-m rounds up to 8 KiB) over a multiple of 256 KiB, so QEMU 7.2's dirty-bitmap sync takes
  // its per-page slow path (which resets the TCG TLB's dirty state) instead of the
  // word-at-a-time fast path (which does not: upstream fix 03bfc2188f, QEMU 9.0).
  if (oddSize) vm.memoryMiB = ramMiB + 8 / 1024;
  src = await startVanillaQemu(c, c.src, vm, 'src', c.dir);
  if (workload === 'mc25') await waitPasses(src.serialLog, 0, 1, 'before migrating');
  else await waitFor(() => /tether-init: run: sleep/.test(fs.readFileSync(src!.serialLog, 'latin1')), 'guest up', 120_000);
  dst = await startVanillaQemu(c, c.dst, vm, 'dst', c.dir, { kind: 'defer' });
  const caps = {
    capabilities: [{ capability: 'postcopy-ram', state: postcopy }, ...extraCaps.map((capability) => ({ capability, state: true }))],
  };
  await dst.qmp.execute('migrate-set-capabilities', caps);
  const uri = `tcp:${c.dst.addr}:49200`;
  await dst.qmp.execute('migrate-incoming', { uri });
  await src.qmp.execute('migrate-set-capabilities', caps);
  await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 10 * 1024 * MiB, 'max-postcopy-bandwidth': 10 * 1024 * MiB });
  const t0 = performance.now();
  await src.qmp.execute('migrate', { uri });
  if (postcopy) await src.qmp.execute('migrate-start-postcopy');
  let m: Rec;
  for (;;) {
    m = (await src.qmp.execute('query-migrate')) as Rec;
    if (m.status === 'completed' || m.status === 'failed' || m.status === 'cancelled') break;
    if (performance.now() - t0 > 60_000) {
      await src.qmp.execute('migrate_cancel');
      throw new Error('no convergence in 60 s');
    }
    await sleep(10);
  }
  const ms = performance.now() - t0;
  log(`migration ${m.status} in ${Math.round(ms)} ms: ${JSON.stringify({ downtime: m.downtime, ram: m.ram })}`);
  const from = fs.statSync(dst.serialLog).size;
  const end = Date.now() + watchS * 1000;
  let panic = '';
  while (Date.now() < end) {
    const text = fs.readFileSync(dst.serialLog, 'latin1');
    const p = /Kernel panic[^\n]*|list_(add|del) corruption[^\n]*/.exec(text);
    if (p) {
      panic = p[0];
      await sleep(1000);
      break;
    }
    await sleep(250);
  }
  const st = await dst.qmp.execute('query-status').catch((e: Error) => e.message);
  log(`destination status ${JSON.stringify(st)} (QEMU exited: ${dst.child.exitCode ?? dst.child.signalCode ?? 'no'})`);
  const keep = `/tmp/precopy-repro-logs/${Date.now()}`;
  fs.mkdirSync(keep, { recursive: true });
  for (const q of [src, dst]) fs.copyFileSync(q.serialLog, `${keep}/${q.label}-serial.log`);
  log(`serial logs kept in ${keep}`);
  const rep = memcheck(dst.serialLog, from);
  const srcRep = memcheck(src.serialLog);
  log(
    `RESULT ram=${ramMiB}${oddSize ? '+8K' : ''} workload=${workload} link=${link} postcopy=${postcopy} caps=${extraCaps.join('+') || '-'}: ` +
      `panic=${panic ? JSON.stringify(panic) : 'no'} dst passes=${rep.passes.length} corrupt=${rep.corrupt.length} ` +
      `(src passes ${srcRep.passes.length})`,
  );
  const text = fs.readFileSync(dst.serialLog, 'latin1');
  process.stdout.write(text.slice(from).split('\n').slice(0, 60).join('\n') + '\n');
  code = panic || rep.corrupt.length ? 2 : 0;
} catch (e) {
  log(`failed: ${(e as Error).stack}`);
} finally {
  await killVanilla(dst);
  await killVanilla(src);
  await c.cleanup();
}
process.exit(code);
