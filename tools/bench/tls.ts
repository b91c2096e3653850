/**
 * The cost of TLS on QEMU's migration stream: `npm run bench migrate -- --only tls`
 *
 * Side by side in one run, at two link speeds (the migration veth shaped with tbf,
 * lib.ts shapeLink): tether migrations that complete with the stream as tether runs it
 * (TLS-PSK, src/migrate/stream-tls.ts) and with TLS switched off on both sides (fault
 * plain-stream). Each migration gets a freshly booted cluster (memcheck guest), the runs
 * alternate TLS / plain so both see the same machine load. QEMU's max-bandwidth is
 * unlimited: the link is the bottleneck.
 *
 * Per run: total (tether's totalMs), post-copy (totalMs - switchoverMs: the RAM transfer
 * under TLS or not, with checkpoints), blackout (source QEMU's STOP to destination QEMU's
 * RESUME, QEMU's own QMP event times). Printed as medians per link and mode with the
 * TLS/plain ratio, beside the decision rule (TLS stays configurable only if it costs more
 * than COST_LIMIT of the total time); JSON to bench-results/migrate-tls.json and the run dir.
 *
 * Options: --tls-links 1gbit,200mbit  --tls-repeats 4  --memcheck-mb 64  --memcheck-rate 8  --guest-mib 512
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../lab/cluster.ts';
import { fileSize } from '../../lab/proc.ts';
import { waitPasses } from '../../lab/serial.ts';
import type { MigrationResult } from '../../src/migrate/result.ts';
import { corruptCheck, digestLogs, log, now, r2, shapeLink, LINKS, withTimeout, type CorruptCheck, type Link } from './lib.ts';

/** TLS stays configurable (default on) only if it costs more than this share of the total time. */
export const COST_LIMIT = 0.1;

export interface TlsOptions {
  links: Link[];
  repeats: number;
  memcheckMB: number;
  /** memcheck MB/s (0: unthrottled). A throttled guest keeps the checkpoints, which share the link, small. */
  memcheckRate: number;
  guestMiB: number;
  outDir: string;
  runDir: string;
}

type Mode = 'tls' | 'plain';

interface TlsRun {
  link: Link;
  mode: Mode;
  n: number;
  exitCode: number | null;
  totalMs: number | null;
  postcopyMs: number | null;
  blackoutMs: number | null;
  checkpoints: number | null;
  memcheck: CorruptCheck[];
  error?: string;
}

/** The median (the mean of the middle two for an even count: with 2 runs a cell, both count). */
const med = (v: (number | null)[]): number | null => {
  const x = v.filter((n): n is number => typeof n === 'number').sort((a, b) => a - b);
  if (x.length === 0) return null;
  const m = x.length >> 1;
  return r2(x.length % 2 ? x[m]! : (x[m - 1]! + x[m]!) / 2);
};

async function one(o: TlsOptions, link: Link, mode: Mode, n: number): Promise<TlsRun> {
  const c = new Cluster({
    ...(mode === 'plain' ? { faults: { source: 'plain-stream', destination: 'plain-stream' } } : {}),
    vm: { memcheckMiB: o.memcheckMB, memcheckMBps: o.memcheckRate, maxBandwidth: 0, memoryMiB: o.guestMiB },
  });
  const run: TlsRun = { link, mode, n, exitCode: null, totalMs: null, postcopyMs: null, blackoutMs: null, checkpoints: null, memcheck: [] };
  try {
    await c.up();
    shapeLink(c, link);
    const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
    if (r.code !== 0) throw new Error(`vm start: ${r.stderr}`);
    await waitPasses(c.serialLog(c.src), 0, 1, 'on the source after boot');
    const offsets = { src: fileSize(c.src.daemonLog), dst: fileSize(c.dst.daemonLog) };
    log(`tls/${link}/${mode} #${n}: migrating`);
    const t0Wall = Date.now();
    const mig = await withTimeout(c.migrate(), 900_000, 'tether migrate');
    run.exitCode = mig.code;
    const res = mig.result as MigrationResult | null;
    if (mig.code !== 0 || !res) throw new Error(`migrate exit ${mig.code}: ${mig.stderr.slice(-800)}`);
    run.totalMs = res.totalMs;
    run.postcopyMs = res.switchoverMs === null ? null : r2(res.totalMs - res.switchoverMs);
    run.checkpoints = res.checkpoints;
    await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 1, 'on the destination');
    await sleep(300);
    const d = digestLogs(c, offsets, t0Wall);
    if (d.qemuStopAt !== null && d.qemuResumeAt !== null) run.blackoutMs = r2(d.qemuResumeAt - d.qemuStopAt);
    log(`tls/${link}/${mode} #${n}: total ${run.totalMs} ms, post-copy ${run.postcopyMs} ms, blackout ${run.blackoutMs} ms`);
  } catch (e) {
    run.error = (e as Error).stack ?? String(e);
    log(`tls/${link}/${mode} #${n} failed: ${(e as Error).message}`);
  } finally {
    run.memcheck = [
      corruptCheck(`${link}/${mode} source`, c.serialLog(c.src)),
      corruptCheck(`${link}/${mode} destination`, c.serialLog(c.dst)),
    ];
    await c.cleanup();
  }
  return run;
}

export async function benchStreamTls(o: TlsOptions): Promise<void> {
  const t0 = now();
  const started = new Date().toISOString();
  const runs: TlsRun[] = [];
  for (const link of o.links) {
    for (let i = 1; i <= o.repeats; i++) {
      // alternate which mode goes first, so neither always follows the other
      const order: Mode[] = i % 2 === 1 ? ['tls', 'plain'] : ['plain', 'tls'];
      for (const mode of order) runs.push(await one(o, link, mode, i));
    }
  }
  const stats = tlsStats(o, runs);
  const worst = Math.max(...stats.map((s) => s.totalCost ?? Infinity));
  const decision =
    worst <= COST_LIMIT
      ? `TLS always on: it costs at most ${(worst * 100).toFixed(1)} % of the total time (limit ${COST_LIMIT * 100} %)`
      : `TLS costs up to ${(worst * 100).toFixed(1)} % of the total time (limit ${COST_LIMIT * 100} %): keep it configurable, default on`;
  const L = tlsTable(o, stats);
  L.push(`decision: ${decision}`);
  const corrupt = runs.reduce((n, r) => n + r.memcheck.reduce((k, m) => k + m.corrupt, 0), 0);
  L.push(`memcheck CORRUPT lines over all runs: ${corrupt}`);
  const text = L.join('\n');
  console.log(text);
  writeTls(o, { started, t0, L, decision, stats, runs });
}

/** Per link: medians of each mode's successful runs, and what TLS costs of the total time. */
function tlsStats(o: TlsOptions, runs: TlsRun[]) {
  return o.links.map((link) => {
    const of = (mode: Mode) => runs.filter((r) => r.link === link && r.mode === mode && r.exitCode === 0);
    const m = (mode: Mode) => ({
      n: of(mode).length,
      totalMs: med(of(mode).map((r) => r.totalMs)),
      postcopyMs: med(of(mode).map((r) => r.postcopyMs)),
      blackoutMs: med(of(mode).map((r) => r.blackoutMs)),
      checkpoints: med(of(mode).map((r) => r.checkpoints)),
      totalRangeMs: of(mode).length ? [Math.min(...of(mode).map((r) => r.totalMs!)), Math.max(...of(mode).map((r) => r.totalMs!))] : null,
    });
    const tls = m('tls');
    const plain = m('plain');
    const cost = tls.totalMs !== null && plain.totalMs ? Math.round(((tls.totalMs - plain.totalMs) / plain.totalMs) * 1000) / 1000 : null;
    return { link, mbit: LINKS[link].mbit, tls, plain, totalCost: cost };
  });
}

/** The console table: one line per link and mode, then TLS against plain per link. */
function tlsTable(o: TlsOptions, stats: ReturnType<typeof tlsStats>): string[] {
  const L: string[] = [];
  L.push(
    `QEMU migration stream: TLS-PSK vs plain (medians of ${o.repeats} per cell; ${o.guestMiB} MiB guest, memcheck ${o.memcheckMB} MB at ${o.memcheckRate || 'unthrottled'} MB/s)`,
  );
  L.push(
    `  ${'link'.padEnd(9)} ${'mode'.padEnd(6)} ${'ok'.padStart(3)} ${'total ms'.padStart(10)} ${'post-copy ms'.padStart(13)} ${'blackout ms'.padStart(12)} ${'ckpts'.padStart(6)}`,
  );
  const f = (v: number | null) => (v === null ? '-' : String(v));
  for (const s of stats) {
    for (const mode of ['tls', 'plain'] as const) {
      const x = s[mode];
      L.push(
        `  ${s.link.padEnd(9)} ${mode.padEnd(6)} ${String(x.n).padStart(3)} ${f(x.totalMs).padStart(10)} ${f(x.postcopyMs).padStart(13)} ${f(x.blackoutMs).padStart(12)} ${f(x.checkpoints).padStart(6)}`,
      );
    }
    const range = (m: Mode) => (s[m].totalRangeMs ? `${s[m].totalRangeMs![0]}-${s[m].totalRangeMs![1]} ms` : '-');
    L.push(
      `  ${s.link.padEnd(9)} TLS/plain total: ${s.totalCost === null ? '-' : `${s.totalCost >= 0 ? '+' : ''}${(s.totalCost * 100).toFixed(1)} %`}` +
        ` (range of the runs: tls ${range('tls')}, plain ${range('plain')})`,
    );
  }
  return L;
}

/** migrate-tls.json into the run's folder and, the latest, under bench-results/. */
function writeTls(
  o: TlsOptions,
  r: { started: string; t0: number; L: string[]; decision: string; stats: ReturnType<typeof tlsStats>; runs: TlsRun[] },
): void {
  const { started, t0, L, decision, stats, runs } = r;
  const json =
    JSON.stringify(
      {
        bench: 'migrate-tls',
        date: started,
        durationMs: r2(now() - t0),
        host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, kernel: os.release(), node: process.version, loadavg: os.loadavg() },
        options: {
          links: o.links,
          repeats: o.repeats,
          memcheckMB: o.memcheckMB,
          memcheckRate: o.memcheckRate,
          guestMiB: o.guestMiB,
          costLimit: COST_LIMIT,
        },
        notes: [
          'total = tether totalMs; post-copy = totalMs - switchoverMs; blackout = source QEMU STOP to destination QEMU RESUME (QMP event times)',
          'plain = fault plain-stream on both daemons; every run on a freshly booted cluster; QEMU max-bandwidth unlimited, the link shaped with tbf',
          'the machine has 2 cores and may run other work at the same time: timings are indicative',
        ],
        summary: L,
        decision,
        stats,
        runs,
      },
      null,
      2,
    ) + '\n';
  fs.mkdirSync(o.runDir, { recursive: true });
  fs.writeFileSync(path.join(o.runDir, 'migrate-tls.json'), json);
  fs.writeFileSync(path.join(o.outDir, 'migrate-tls.json'), json);
  console.log(`wrote ${path.join(o.outDir, 'migrate-tls.json')} (and ${o.runDir}/migrate-tls.json)`);
}
