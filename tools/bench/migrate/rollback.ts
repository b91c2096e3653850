/**
 * The rollback part of the migration benchmark: per standby mode one VM, migrated and
 * interrupted mid post-copy again and again (tether abort, kill -9 of the destination QEMU,
 * link down), each restore's timings, and their p50/p99 per mode side by side.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../../lab/cluster.ts';
import { fileSize, qemuAlive, waitFor } from '../../../lab/proc.ts';
import { waitPasses } from '../../../lab/serial.ts';
import { loadVmConfig } from '../../../src/config/load.ts';
import type { MigrationResult } from '../../../src/migrate/result.ts';
import { percentile } from '../../../src/util/time.ts';
import { corruptCheck, digestLogs, log, now, r2, status, timelineOf, withTimeout, type CorruptCheck, type Rec } from '../lib.ts';
import type { TimelineInput } from '../report.ts';
import { bootVm, clusterOpts, keepLogs, MIGRATE_DEADLINE_MS, opt, waitNotRunningOn } from './plan.ts';

export type InterruptKind = 'abort' | 'kill-destination-qemu' | 'link-down';
export type StandbyMode = 'hot' | 'cold';

export interface RollbackRun {
  kind: InterruptKind;
  /** Whether the VM was configured with migration.hotStandby. */
  standby: StandbyMode;
  bandwidthMiB: number;
  /** Checkpoint applied on the source when we interrupted. */
  appliedAtInterrupt: number | null;
  /** From `tether migrate` spawned to the interrupt. */
  interruptAtMs: number;
  /** From the interrupt to `tether migrate` returning. */
  interruptToResultMs: number;
  exitCode: number | null;
  outcome: string | null;
  reason: string | null;
  resumedEpoch: number | null;
  rollback: MigrationResult['rollback'] | null;
  result: MigrationResult | null;
  sourceRunningAfter: boolean;
  passesAfter: number[];
  corruptAfter: number;
  fences: { host: string; reason: string }[];
  warnings: Record<string, number>;
  timeline?: TimelineInput;
  error?: string;
}

export async function interruptOnce(c: Cluster, kind: InterruptKind, standby: StandbyMode, n: number): Promise<RollbackRun> {
  const run: RollbackRun = {
    kind,
    standby,
    bandwidthMiB: opt.rollbackBandwidthMiB,
    appliedAtInterrupt: null,
    interruptAtMs: 0,
    interruptToResultMs: 0,
    exitCode: null,
    outcome: null,
    reason: null,
    resumedEpoch: null,
    rollback: null,
    result: null,
    sourceRunningAfter: false,
    passesAfter: [],
    corruptAfter: 0,
    fences: [],
    warnings: {},
  };
  const srcLog = c.serialLog(c.src);
  await waitNotRunningOn(c, c.dst);
  await waitPasses(srcLog, fileSize(srcLog), opt.passes, `before the migration interrupted by ${kind}`);
  const offsets = { src: fileSize(c.src.daemonLog), dst: fileSize(c.dst.daemonLog) };
  log(`rollback/${kind}: migrating`);
  const t0Wall = Date.now();
  const t0 = now();
  const migrating = withTimeout(c.migrate(), MIGRATE_DEADLINE_MS, `tether migrate (${kind})`);
  let settled = false;
  void migrating.then(
    () => (settled = true),
    () => (settled = true),
  );
  await waitFor(async () => {
    if (settled) return true;
    const s = await status(c, c.src);
    run.appliedAtInterrupt = s.migration?.appliedEpoch ?? null;
    return (run.appliedAtInterrupt ?? -1) >= opt.interruptEpoch || (s.state !== 'migrating-out' && s.state !== 'running');
  }, `checkpoint ${opt.interruptEpoch} applied on the source`);
  if (settled || (run.appliedAtInterrupt ?? -1) < opt.interruptEpoch) {
    const m = await migrating;
    throw new Error(`migration ended before the interrupt point: exit ${m.code} ${JSON.stringify(m.result)} ${m.stderr.slice(-800)}`);
  }
  const tInt = now();
  run.interruptAtMs = r2(tInt - t0);
  log(`rollback/${kind}: interrupting at checkpoint ${run.appliedAtInterrupt}`);
  if (kind === 'abort') {
    const a = await c.tether(c.src, ['abort', c.vmName]);
    if (a.code !== 0) throw new Error(`tether abort failed: ${a.stderr}`);
  } else if (kind === 'kill-destination-qemu') {
    const d = await status(c, c.dst);
    if (typeof d.pid !== 'number') throw new Error(`no destination QEMU pid: ${JSON.stringify(d)}`);
    process.kill(d.pid, 'SIGKILL');
  } else {
    c.linkDown();
  }
  const mig = await migrating;
  run.interruptToResultMs = r2(now() - tInt);
  if (kind === 'link-down') c.linkUp(); // the next migration of this VM needs it
  run.exitCode = mig.code;
  run.result = mig.result as MigrationResult | null;
  run.outcome = run.result?.outcome ?? null;
  run.reason = run.result?.reason ?? null;
  run.rollback = run.result?.rollback ?? null;
  run.resumedEpoch = run.result?.rollback?.epoch ?? null;
  log(`rollback/${kind}: ${run.outcome} (${run.reason}), restore ${run.rollback?.restoreMs ?? '?'} ms`);
  const s = await status(c, c.src);
  run.sourceRunningAfter = s.state === 'running' && qemuAlive(s.pid);
  const from = fileSize(srcLog);
  const rep = await waitPasses(srcLog, from, opt.passes, `on the source after the rollback (${kind})`);
  run.passesAfter = rep.passes;
  run.corruptAfter = rep.corrupt.length;
  await sleep(300);
  const dg = digestLogs(c, offsets, t0Wall);
  run.fences = dg.fences;
  run.warnings = dg.warnings;
  run.timeline = timelineOf(`rollback ${standby} #${n} (${kind})`, mig.progress, dg, run.result);
  return run;
}

export interface RestoreStats {
  standby: StandbyMode;
  /** Successful rollbacks measured. */
  n: number;
  /** Of those, how many the hot standby served (the rest started a fresh QEMU). */
  hot: number;
  restoreMs: { p50: number; p99: number; max: number } | null;
  killMs: number | null;
  startMs: number | null;
  announceMs: number | null;
}

export interface RollbackBench {
  /** VM checkpoint settings the interrupted runs used (lease / fence timeouts). */
  checkpointConfig: Rec | null;
  runs: (RollbackRun & { bootMs?: number })[];
  stats: RestoreStats[];
  memcheck: CorruptCheck[];
}

export function median(v: number[]): number | null {
  return v.length === 0 ? null : r2(percentile(v, 50));
}

export function restoreStats(standby: StandbyMode, runs: RollbackRun[]): RestoreStats {
  const ok = runs.filter((r) => r.standby === standby && r.outcome === 'rolled-back' && r.rollback && r.rollback.epoch !== null);
  const f = ok.map((r) => r.rollback!);
  const restore = f.map((x) => x.restoreMs);
  return {
    standby,
    n: ok.length,
    hot: f.filter((x) => x.hot).length,
    restoreMs: restore.length ? { p50: r2(percentile(restore, 50)), p99: r2(percentile(restore, 99)), max: Math.max(...restore) } : null,
    killMs: median(f.map((x) => x.killMs)),
    startMs: median(f.map((x) => x.startMs)),
    announceMs: median(f.map((x) => x.announceMs)),
  };
}

/**
 * Per standby mode one freshly booted VM, migrated and interrupted `rollbackRepeats` times
 * in a row (the interrupts taken in turn from --rollback-kinds): the restores of both
 * modes side by side, under the same load.
 */
export async function benchRollback(): Promise<RollbackBench> {
  const out: RollbackBench = { checkpointConfig: null, runs: [], stats: [], memcheck: [] };
  const modes: StandbyMode[] = opt.standby === 'both' ? ['hot', 'cold'] : opt.standby === 'on' ? ['hot'] : ['cold'];
  for (const mode of modes) {
    // hold-completion on the destination: every run reaches its interrupt point, however
    // fast the machine (the migration cannot complete first); nothing else changes
    const c = new Cluster({ ...clusterOpts(opt.rollbackBandwidthMiB, mode === 'hot', opt.rollbackVm === 'io'), holdCompletion: true });
    try {
      log(`rollback/${mode}: booting the VM`);
      const bootMs = await bootVm(c);
      out.checkpointConfig ??= { ...loadVmConfig(c.vmConfig).checkpoint };
      for (let i = 0; i < opt.rollbackRepeats; i++) {
        const kind = opt.rollbackKinds[i % opt.rollbackKinds.length] as InterruptKind;
        try {
          out.runs.push({ ...(await interruptOnce(c, kind, mode, i + 1)), ...(i === 0 ? { bootMs } : {}) });
        } catch (e) {
          log(`rollback/${mode}/${kind} failed: ${(e as Error).message}`);
          out.runs.push({ kind, standby: mode, error: (e as Error).stack ?? String(e) } as RollbackRun);
          break; // the VM's state is unknown: no more runs on it
        }
      }
    } catch (e) {
      log(`rollback/${mode} failed: ${(e as Error).message}`);
      out.runs.push({ kind: 'abort', standby: mode, error: (e as Error).stack ?? String(e) } as RollbackRun);
    } finally {
      out.memcheck.push(
        corruptCheck(`rollback/${mode} source serial`, c.serialLog(c.src)),
        corruptCheck(`rollback/${mode} destination serial`, c.serialLog(c.dst)),
      );
      keepLogs(c, `rollback-${mode}`);
      await c.cleanup();
    }
    out.stats.push(restoreStats(mode, out.runs));
  }
  return out;
}
