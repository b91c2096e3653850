/**
 * The completing parts of the migration benchmark: (1) a tether migration that completes, with
 * its per-checkpoint figures, and (2) vanilla QEMU post-copy of the same VM config, QEMU
 * started directly in the namespaces, timed from `migrate` to the source's `completed`.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../../lab/cluster.ts';
import { fileSize, waitFor } from '../../../lab/proc.ts';
import { waitPasses } from '../../../lab/serial.ts';
import { loadVmConfig } from '../../../src/config/load.ts';
import type { MigrationResult } from '../../../src/migrate/result.ts';
import {
  corruptCheck,
  digestLogs,
  killVanilla,
  log,
  now,
  r2,
  startVanillaQemu,
  timelineOf,
  withTimeout,
  type CorruptCheck,
  type LogDigest,
  type Rec,
  type VQemu,
} from '../lib.ts';
import type { TimelineInput } from '../report.ts';
import { bootVm, clusterOpts, keepLogs, LOG_DIR, MIGRATE_DEADLINE_MS, opt, VANILLA_PORT } from './plan.ts';

export interface TetherComplete {
  bandwidthMiB: number;
  bootMs: number;
  exitCode: number | null;
  /** Wall time of the `tether migrate --json` CLI (includes Node start of the CLI). */
  cliWallMs: number;
  result: MigrationResult | null;
  digest: LogDigest;
  /** memcheck passes completed on the destination after the migration. */
  passesAfter: number[];
  memcheck: CorruptCheck[];
  timeline?: TimelineInput;
  error?: string;
}

export async function benchTetherComplete(): Promise<TetherComplete> {
  const c = new Cluster(clusterOpts(opt.bandwidthMiB));
  const out: TetherComplete = {
    bandwidthMiB: opt.bandwidthMiB,
    bootMs: 0,
    exitCode: null,
    cliWallMs: 0,
    result: null,
    digest: { checkpoints: [], phases: [], qemuStopAt: null, qemuResumeAt: null, warnings: {}, fences: [] },
    passesAfter: [],
    memcheck: [],
  };
  try {
    log('tether (completing): booting the VM');
    out.bootMs = await bootVm(c);
    const offsets = { src: fileSize(c.src.daemonLog), dst: fileSize(c.dst.daemonLog) };
    const from = fileSize(c.serialLog(c.src));
    await waitPasses(c.serialLog(c.src), from, opt.passes, 'before the tether migration');
    log('tether (completing): migrating');
    const t0Wall = Date.now();
    const t0 = now();
    const mig = await withTimeout(c.migrate(), MIGRATE_DEADLINE_MS, 'tether migrate');
    out.cliWallMs = r2(now() - t0);
    out.exitCode = mig.code;
    out.result = mig.result as MigrationResult | null;
    if (mig.code !== 0) out.error = `tether migrate exit ${mig.code}: ${mig.stderr.slice(-1500)}`;
    log(`tether (completing): ${out.result?.outcome ?? 'no result'} in ${out.result?.totalMs ?? '?'} ms`);
    if (mig.code === 0) {
      const dstFrom = fileSize(c.serialLog(c.dst));
      const rep = await waitPasses(c.serialLog(c.dst), dstFrom, opt.passes, 'on the destination after the tether migration');
      out.passesAfter = rep.passes;
    }
    await sleep(300); // let the daemons flush their last log lines
    out.digest = digestLogs(c, offsets, t0Wall);
    out.timeline = timelineOf('tether migration (completing)', mig.progress, out.digest, out.result);
  } catch (e) {
    out.error = (e as Error).stack ?? String(e);
    log(`tether (completing) failed: ${(e as Error).message}`);
  } finally {
    out.memcheck = [
      corruptCheck('tether source serial', c.serialLog(c.src)),
      corruptCheck('tether destination serial', c.serialLog(c.dst)),
    ];
    keepLogs(c, 'tether-complete');
    await c.cleanup();
  }
  return out;
}

export interface VanillaResult {
  bandwidthMiB: number;
  bootMs: number;
  /** Destination QEMU spawn → QMP up, caps set, migrate-incoming listening. */
  destinationSetupMs: number;
  /** `migrate` sent → source query-migrate `completed` (polled every 10 ms). */
  totalMs: number;
  /** destinationSetupMs + totalMs: closer to what tether's totalMs includes. */
  totalInclDestinationSetupMs: number;
  /** `migrate` sent → first source query-migrate `postcopy-active`. */
  switchoverMs: number | null;
  /** `migrate` sent → destination query-status `running`. */
  destinationRunningMs: number | null;
  /** `migrate` sent → destination query-migrate `completed`. */
  destinationCompletedMs: number | null;
  /** QEMU's own final query-migrate on the source. */
  qemuStats: Rec | null;
  passesAfter: number[];
  memcheck: CorruptCheck[];
  error?: string;
}

export async function benchVanilla(): Promise<VanillaResult> {
  const c = new Cluster(clusterOpts(opt.bandwidthMiB));
  const out: VanillaResult = {
    bandwidthMiB: opt.bandwidthMiB,
    bootMs: 0,
    destinationSetupMs: 0,
    totalMs: 0,
    totalInclDestinationSetupMs: 0,
    switchoverMs: null,
    destinationRunningMs: null,
    destinationCompletedMs: null,
    qemuStats: null,
    passesAfter: [],
    memcheck: [],
  };
  let src: VQemu | undefined;
  let dst: VQemu | undefined;
  try {
    await c.up(); // the daemons stay idle: only the namespaces and the VM YAML are used
    const vm = loadVmConfig(c.vmConfig);
    const bw = vm.migration.maxBandwidth;
    log('vanilla: booting the VM (QEMU directly, source namespace)');
    const tb = now();
    src = await startVanillaQemu(c, c.src, vm, 'src', LOG_DIR);
    const rep0 = await waitPasses(src.serialLog, 0, opt.passes, 'on the vanilla source after boot');
    if (rep0.corrupt.length) throw new Error(`memcheck CORRUPT before migrating: ${rep0.corrupt[0]}`);
    out.bootMs = r2(now() - tb);
    const from = fileSize(src.serialLog);
    await waitPasses(src.serialLog, from, opt.passes, 'before the vanilla migration');

    log('vanilla: destination QEMU -incoming defer');
    const td = now();
    dst = await startVanillaQemu(c, c.dst, vm, 'dst', LOG_DIR, { kind: 'defer' });
    const caps = { capabilities: [{ capability: 'postcopy-ram', state: true }] };
    await dst.qmp.execute('migrate-set-capabilities', caps);
    const uri = `tcp:${c.dst.addr}:${VANILLA_PORT}`;
    await dst.qmp.execute('migrate-incoming', { uri });
    out.destinationSetupMs = r2(now() - td);
    await src.qmp.execute('migrate-set-capabilities', caps);
    if (bw > 0) await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': bw, 'max-postcopy-bandwidth': bw });

    log('vanilla: migrate + migrate-start-postcopy');
    const t0 = now();
    await src.qmp.execute('migrate', { uri });
    await src.qmp.execute('migrate-start-postcopy');
    const watcher = watchDestination(dst, out, t0);
    await pollSource(src, out, t0);
    out.totalInclDestinationSetupMs = r2(out.destinationSetupMs + out.totalMs);
    log(`vanilla: completed in ${out.totalMs} ms`);
    await waitFor(() => out.destinationCompletedMs !== null, 'vanilla destination completed', 30_000).catch((e: Error) =>
      log(`vanilla: ${e.message}: no destination-completed figure`),
    );
    await watcher.stop();
    const dstFrom = fileSize(dst.serialLog);
    const rep = await waitPasses(dst.serialLog, dstFrom, opt.passes, 'on the vanilla destination after the migration');
    out.passesAfter = rep.passes;
  } catch (e) {
    out.error = (e as Error).stack ?? String(e);
    log(`vanilla failed: ${(e as Error).message}`);
  } finally {
    if (src) out.memcheck.push(corruptCheck('vanilla source serial', src.serialLog));
    if (dst) out.memcheck.push(corruptCheck('vanilla destination serial', dst.serialLog));
    keepLogs(c, 'vanilla');
    await killVanilla(dst);
    await killVanilla(src);
    await c.cleanup();
  }
  return out;
}

/**
 * The destination seen from its own QMP: when it runs (the post-copy switchover) and when its
 * migration completes, polled every 10 ms until both are seen or stop() is called.
 */
function watchDestination(d: VQemu, out: VanillaResult, t0: number): { stop(): Promise<void> } {
  let stopWatch = false;
  const watch = (async () => {
    while (!stopWatch && (out.destinationRunningMs === null || out.destinationCompletedMs === null)) {
      try {
        if (out.destinationRunningMs === null) {
          const s = (await d.qmp.execute('query-status')) as { status: string };
          if (s.status === 'running') out.destinationRunningMs = r2(now() - t0);
        }
        if (out.destinationCompletedMs === null) {
          const m = (await d.qmp.execute('query-migrate')) as { status?: string };
          if (m.status === 'completed') out.destinationCompletedMs = r2(now() - t0);
        }
      } catch {
        return; // the destination QEMU is gone: what was seen stays, the rest stays null
      }
      await sleep(10);
    }
  })();
  return {
    stop: async () => {
      stopWatch = true;
      await watch;
    },
  };
}

/** Poll the source's query-migrate every 10 ms until it completes; throws on failure or after the deadline. */
async function pollSource(src: VQemu, out: VanillaResult, t0: number): Promise<void> {
  const deadline = Date.now() + MIGRATE_DEADLINE_MS;
  for (;;) {
    const m = (await src.qmp.execute('query-migrate')) as Rec;
    if (m.status === 'postcopy-active' && out.switchoverMs === null) out.switchoverMs = r2(now() - t0);
    if (m.status === 'completed') {
      out.totalMs = r2(now() - t0);
      out.qemuStats = m;
      return;
    }
    if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`vanilla migration ${m.status}: ${m['error-desc'] ?? ''}`);
    if (Date.now() > deadline) throw new Error('vanilla migration did not complete');
    await sleep(10);
  }
}
