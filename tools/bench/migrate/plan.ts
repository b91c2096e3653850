/**
 * The migration benchmark's options (from the command line), where it writes, and what its
 * parts share: the Cluster options of a run, booting the VM, keeping a run's logs.
 */
import fs from 'node:fs';
import path from 'node:path';
import { Cluster } from '../../../lab/cluster.ts';
import { waitFor } from '../../../lab/proc.ts';
import { waitPasses } from '../../../lab/serial.ts';
import { ROOT, type Host } from '../../../lab/topology.ts';
import { num, str } from '../args.ts';
import { copyClusterLogs, MiB, now, r2, status } from '../lib.ts';

export const quick = process.argv.includes('--quick');
export const opt = {
  quick,
  guestMiB: num('guest-mib', 512),
  memcheckMB: num('memcheck-mb', quick ? 64 : 256),
  memcheckRate: num('memcheck-rate', 0),
  intervalMs: num('interval-ms', 50),
  bandwidthMiB: num('bandwidth-mib', quick ? 0 : 16),
  rollbackBandwidthMiB: num('rollback-bandwidth-mib', 16),
  interruptEpoch: num('interrupt-epoch', 3),
  passes: num('passes', quick ? 1 : 2),
  only: new Set(str('only', 'tether,vanilla,rollback').split(',')),
  standby: str('standby', 'both'),
  rollbackRepeats: num('rollback-repeats', quick ? 1 : 4),
  rollbackKinds: str('rollback-kinds', quick ? 'abort' : 'abort,kill-destination-qemu').split(','),
  rollbackVm: str('rollback-vm', 'plain'),
};
if (!['on', 'off', 'both'].includes(opt.standby)) throw new Error('--standby must be on, off or both');
if (!['plain', 'io'].includes(opt.rollbackVm)) throw new Error('--rollback-vm must be plain or io');
for (const k of opt.rollbackKinds) {
  if (!['abort', 'kill-destination-qemu', 'link-down'].includes(k)) throw new Error(`unknown --rollback-kinds entry ${k}`);
}
export const OUT_DIR = path.join(ROOT, 'bench-results');
export const STARTED = new Date().toISOString();
/** This run's folder: results, plots and the daemons', QEMUs' and guests' logs (logs/). */
export const RUN_DIR = path.join(OUT_DIR, `migrate-${STARTED.replaceAll(':', '').replace(/\.\d+Z$/, 'Z')}`);
export const LOG_DIR = path.join(RUN_DIR, 'logs');
export const VANILLA_PORT = 49_200;
/** Deadlines only keep a broken run from hanging; they are not performance limits. */
export const MIGRATE_DEADLINE_MS = 900_000;

export function rollbackVmNote(): string {
  return opt.rollbackVm === 'io' ? 'VM with a gate NIC and a journaled disk' : 'VM without NIC or disk';
}

export function clusterOpts(bandwidthMiB: number, hotStandby = true, io = false) {
  return {
    ...(io ? { guestNet: 'gate' as const, disk: { guest: 'diskcheck' as const } } : {}),
    vm: {
      memcheckMiB: opt.memcheckMB,
      memcheckMBps: opt.memcheckRate,
      intervalMs: opt.intervalMs,
      maxBandwidth: Math.round(bandwidthMiB * MiB),
      hotStandby,
      memoryMiB: opt.guestMiB,
      // with a disk the guest's main program is diskcheck: memcheck runs beside it
      ...(io ? { appendExtra: `tether.bg=memcheck:${opt.memcheckMB}:${opt.memcheckRate}` } : {}),
    },
  };
}

export function keepLogs(c: Cluster, label: string, extra: string[] = []): void {
  const dir = path.join(LOG_DIR, label);
  if (label !== 'vanilla') fs.rmSync(dir, { recursive: true, force: true }); // vanilla/ holds the QEMU files
  fs.mkdirSync(dir, { recursive: true });
  copyClusterLogs(
    c,
    dir,
    extra.map((f): [string, string] => [f, path.relative(c.dir, f).replaceAll('/', '_')]),
  );
}

export async function bootVm(c: Cluster): Promise<number> {
  const t0 = now();
  await c.up();
  const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
  if (r.code !== 0) throw new Error(`tether vm start failed: ${r.stderr}`);
  const rep = await waitPasses(c.serialLog(c.src), 0, opt.passes, 'on the source after boot');
  if (rep.corrupt.length) throw new Error(`memcheck CORRUPT before migrating: ${rep.corrupt[0]}`);
  return r2(now() - t0);
}

export async function waitNotRunningOn(c: Cluster, h: Host): Promise<void> {
  await waitFor(
    async () => {
      const s = await status(c, h);
      return s.state !== 'running' && s.state !== 'migrating-in';
    },
    `VM stopped on ${h.name}`,
    60_000,
  );
}
