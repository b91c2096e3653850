/**
 * The stall after switchover (--only stall): how long a netclient's conversation pauses around the switchover, tether beside vanilla QEMU post-copy.
 */
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../../lab/cluster.ts';
import { fileSize, waitFor } from '../../../lab/proc.ts';
import { type Host } from '../../../lab/topology.ts';
import { type NetClient } from '../../../lab/net/driver.ts';
import { loadVmConfig } from '../../../src/config/load.ts';
import { type Figure } from '../report.ts';
import { killVanilla, shapeLink, startVanillaQemu, type Link, type VQemu } from '../lib.ts';
import { median, stallAround, largestGap, type StallFigure } from '../stall.ts';
import { type Rec, boot, keepLogs, readText, records, waitReachable } from './measure.ts';
import { LOG_DIR, MiB, log, now, opt, r2 } from './plan.ts';

/** Client query interval of the stall bench (issue 16: a query every 20 ms). */
export const STALL_QUERY_MS = 20;
/** tether ≤ this × vanilla post-copy's stall (issue 16). */
export const TARGET_STALL_RATIO = 2;
export const STALL_VANILLA_PORT = 49_300;
/** Answers after the switchover before a tether run is aborted (1 s at 20 ms). */
export const STALL_ANSWERS_AFTER = 50;
/** Answers from this long before the migrate request count (vanilla's STOP follows it within ms). */
export const STALL_LOOKBACK_MS = 2000;

export interface StallRun {
  side: 'tether' | 'vanilla';
  link: Link;
  /** Around the switchover (tether: the source's QEMU STOP before switchover, from its log; vanilla: the source's QMP STOP event). */
  stall: StallFigure;
  /** The largest gap between the answers counted (2 s before the migrate request to the abort / a second of answers after completion): a cross-check. */
  largestGap: StallFigure;
  switchAt: number | null;
  /** The migration's outcome: tether is aborted (rolled back) after the first second of answers on the destination. */
  outcome: string | null;
  answers: number;
  /** Answer arrival times (ms after the migrate request), kept for a later look. */
  answerTimes: number[];
  error?: string;
}

export interface StallResult {
  runs: StallRun[];
  bootMs: { tether: number; vanilla: number };
  error?: string;
}

/** One tether migration: the stall around the switchover, then `tether abort` (hold-completion keeps the window open). */
export async function tetherStallRun(c: Cluster, client: NetClient, link: Link): Promise<StallRun> {
  const srcFrom = fileSize(c.src.daemonLog);
  const t0 = Date.now();
  const migrating = c.migrate();
  let ended = false;
  void migrating.finally(() => (ended = true));
  const switchRec = (): Rec | undefined => records(c.src.daemonLog, srcFrom).find((r) => r.to === 'switchover');
  await waitFor(() => ended || switchRec() !== undefined, 'tether switchover (source log)', 180_000);
  const rec = switchRec();
  const switchAt = rec ? (typeof rec.qemuStopAt === 'number' ? rec.qemuStopAt : Date.parse(String(rec.t))) : null;
  if (switchAt !== null)
    await waitFor(
      () => ended || client.answers(switchAt + 1).length >= STALL_ANSWERS_AFTER || Date.now() - switchAt > 60_000,
      'answers after the tether switchover',
    );
  const t1 = Date.now();
  if (!ended) {
    const a = await c.tether(c.src, ['abort', c.vmName]);
    if (a.code !== 0) log(`abort: ${a.stderr}`);
  }
  const mig = await migrating;
  // from before the migrate request (the STOP can follow it within ms) to the abort
  const times = client
    .answers(t0 - STALL_LOOKBACK_MS)
    .map((e) => e.t)
    .filter((x) => x <= t1);
  await waitReachable(c, 'the guest answers on the source after the rollback');
  const sinceBack = Date.now();
  await client.waitAnswers(10, 'after the rollback', sinceBack, 60_000);
  return {
    side: 'tether',
    link,
    stall: stallAround(times, switchAt, STALL_ANSWERS_AFTER),
    largestGap: largestGap(times),
    switchAt,
    outcome: (mig.result?.outcome as string | undefined) ?? null,
    answers: times.length,
    answerTimes: times.map((x) => x - t0),
  };
}

/** One vanilla post-copy migration (migrate, then migrate-start-postcopy at once) to the other host; returns the new QEMU. */
export async function vanillaStallRun(
  c: Cluster,
  client: NetClient,
  link: Link,
  from: { q: VQemu; h: Host },
  k: number,
): Promise<{ run: StallRun; to: { q: VQemu; h: Host } }> {
  const toHost = from.h === c.src ? c.dst : c.src;
  const vm = loadVmConfig(c.vmConfig);
  const q = await startVanillaQemu(c, toHost, vm, `v${k}`, LOG_DIR, { kind: 'defer' });
  const caps = { capabilities: [{ capability: 'postcopy-ram', state: true }] };
  await q.qmp.execute('migrate-set-capabilities', caps);
  const uri = `tcp:${toHost.addr}:${STALL_VANILLA_PORT}`;
  await q.qmp.execute('migrate-incoming', { uri });
  await from.q.qmp.execute('migrate-set-capabilities', caps);
  // QEMU unthrottled: the tbf-shaped link is the limit, as for tether (its VM config's maxBandwidth 0)
  await from.q.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 10 * 1024 * MiB, 'max-postcopy-bandwidth': 0 });
  let switchAt: number | null = null;
  const onEv = (name: string, _d: unknown, ts: { seconds: number; microseconds: number } | undefined): void => {
    if (name === 'STOP' && switchAt === null && ts) switchAt = ts.seconds * 1000 + ts.microseconds / 1000;
  };
  from.q.qmp.on('event', onEv);
  const t0 = Date.now();
  let outcome: string | null = null;
  try {
    await from.q.qmp.execute('migrate', { uri });
    await from.q.qmp.execute('migrate-start-postcopy');
    const deadline = Date.now() + 180_000;
    for (;;) {
      const m = (await from.q.qmp.execute('query-migrate')) as Rec;
      if (m.status === 'completed') {
        outcome = 'completed';
        break;
      }
      if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`vanilla migration ${m.status}: ${m['error-desc'] ?? ''}`);
      if (Date.now() > deadline) throw new Error('vanilla post-copy did not complete');
      await sleep(20);
    }
  } finally {
    from.q.qmp.off('event', onEv);
  }
  const sw = switchAt as number | null;
  if (sw !== null)
    await waitFor(
      () => client.answers(sw + 1).length >= STALL_ANSWERS_AFTER || Date.now() - sw > 60_000,
      'answers after the vanilla switchover',
    );
  const t1 = Date.now();
  const times = client
    .answers(t0 - STALL_LOOKBACK_MS)
    .map((e) => e.t)
    .filter((x) => x <= t1);
  await killVanilla(from.q);
  fs.rmSync(`/dev/shm/tether-${c.id}/vanilla/${from.q.label}.ram`, { force: true });
  return {
    run: {
      side: 'vanilla',
      link,
      stall: stallAround(times, sw, STALL_ANSWERS_AFTER),
      largestGap: largestGap(times),
      switchAt: sw,
      outcome,
      answers: times.length,
      answerTimes: times.map((x) => x - t0),
    },
    to: { q, h: toHost },
  };
}

/**
 * The client-visible stall after switchover, tether beside vanilla QEMU post-copy: two
 * clusters booted side by side (tether: the gate cluster with hold-completion, every
 * migration aborted once the client has had a second of answers from the destination;
 * vanilla: QEMU started directly on the cluster's TAPs, migrated back and forth between
 * the hosts), a netclient in each client namespace querying every 20 ms; for each
 * --stall-links setting, --stall-repeats migrations of each, alternating.
 */
export async function stallBench(): Promise<StallResult> {
  const vmOpts = {
    memcheckMiB: 4,
    memcheckMBps: 1,
    memoryMiB: opt.guestMiB,
    intervalMs: opt.intervals[0]!,
    maxBandwidth: 0, // the tbf link is the limit
    hotStandby: false,
  };
  const tc = new Cluster({ guestNet: 'gate', holdCompletion: true, vm: vmOpts });
  const vc = new Cluster({ guestNet: 'qemu-tap', vm: vmOpts });
  const out: StallResult = { runs: [], bootMs: { tether: 0, vanilla: 0 } };
  let cur: { q: VQemu; h: Host } | undefined;
  try {
    await tc.up();
    await vc.up(); // its daemons stay idle: only the namespaces, the TAPs and the VM YAML are used
    const tb = now();
    const vanillaBoot = (async () => {
      const q = await startVanillaQemu(vc, vc.src, loadVmConfig(vc.vmConfig), 'v0', LOG_DIR);
      cur = { q, h: vc.src };
      await waitReachable(vc, 'vanilla: the guest answers ping');
      await waitFor(() => /netcheck listening/.test(readText(q.serialLog)), 'vanilla: netcheck listening', 120_000);
      return r2(now() - tb);
    })();
    const [tBoot, vBoot] = await Promise.all([boot(tc, 'stall tether'), vanillaBoot]);
    out.bootMs = { tether: tBoot, vanilla: vBoot };
    const tClient = tc.netclient({ intervalMs: STALL_QUERY_MS });
    const vClient = vc.netclient({ intervalMs: STALL_QUERY_MS });
    await tClient.waitAnswers(20, 'tether before the first migration', 0, 60_000);
    await vClient.waitAnswers(20, 'vanilla before the first migration', 0, 60_000);
    let k = 0;
    for (const link of opt.stallLinks) {
      shapeLink(tc, link);
      shapeLink(vc, link);
      for (let i = 0; i < opt.stallRepeats; i++) {
        const t = await tetherStallRun(tc, tClient, link);
        out.runs.push(t);
        log(`stall ${link} #${i + 1}: tether ${t.stall.ms} ms (largest gap ${t.largestGap.ms} ms, ${t.outcome})`);
        const v = await vanillaStallRun(vc, vClient, link, cur!, ++k);
        cur = v.to;
        out.runs.push(v.run);
        log(`stall ${link} #${i + 1}: vanilla ${v.run.stall.ms} ms (largest gap ${v.run.largestGap.ms} ms)`);
      }
    }
    const bad = [...tClient.violations, ...vClient.violations];
    if (bad.length) out.error = `netclient violations: ${JSON.stringify(bad.slice(0, 3))}`;
    await tClient.stop();
    await vClient.stop();
  } catch (e) {
    out.error = (e as Error).stack ?? String(e);
    log(`stall failed: ${(e as Error).message}`);
  } finally {
    keepLogs(tc, 'stall-tether');
    keepLogs(vc, 'stall-vanilla');
    if (cur) await killVanilla(cur.q);
    await Promise.all([tc.cleanup(), vc.cleanup()]);
  }
  return out;
}

export function stallFigures(s: StallResult | undefined): Figure[] {
  if (!s) return [];
  const F: Figure[] = [];
  for (const link of opt.stallLinks) {
    const of = (side: string): StallRun[] => s.runs.filter((r) => r.link === link && r.side === side);
    const t = of('tether');
    const v = of('vanilla');
    const tm = median(t.map((r) => r.stall.ms));
    const vm = median(v.map((r) => r.stall.ms));
    const each = (rs: StallRun[]): string => `runs: ${rs.map((r) => r.stall.ms ?? '–').join(', ')} ms`;
    F.push({ name: `stall after switchover, tether (link ${link})`, value: tm === null ? null : r2(tm), unit: 'ms', note: each(t) });
    F.push({
      name: `stall after switchover, vanilla post-copy (link ${link})`,
      value: vm === null ? null : r2(vm),
      unit: 'ms',
      note: each(v),
    });
    F.push({
      name: `stall after switchover, tether / vanilla (link ${link})`,
      value: tm !== null && vm ? r2(tm / vm) : null,
      unit: '×',
      target: { op: '<=', value: TARGET_STALL_RATIO },
    });
  }
  return F;
}
