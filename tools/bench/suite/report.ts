/**
 * The suite's report: per-cell statistics over the runs (medians; pauses pooled), the figures
 * against their targets, and the files a run leaves (suite.json, summary.md, and the latest
 * under bench-results/). A MISS is a finding about the run, never a failure.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { percentile } from '../../../src/util/time.ts';
import { MiB, now, r2, type HashFloor, type Link, type Rec } from '../lib.ts';
import { markdownTable, type Figure } from '../report.ts';
import { isMemcheck } from './observe.ts';
import {
  BLACKOUT_NOTE,
  cellKey,
  opt,
  OUT_DIR,
  PRECOPY_NOTE,
  PROGRESS_NOTE,
  quick,
  reportOnly,
  RUN_DIR,
  RUNS_DIR,
  STARTED,
  TRULY_DIRTIED_NOTE,
  type Cell,
  type Strategy,
  type Workload,
} from './plan.ts';
import type { Extras } from './reused.ts';
import type { PauseSplit, Run } from './run.ts';

// ------------------------------------------------------------------ aggregation

export const med = (v: (number | null | undefined)[]): number | null => {
  const x = v.filter((n): n is number => typeof n === 'number' && Number.isFinite(n));
  return x.length ? r2(percentile(x, 50)) : null;
};
export const pct = (v: number[], p: number): number | null => (v.length ? r2(percentile(v, p)) : null);

export interface CellStats {
  key: string;
  cell: Cell;
  n: number;
  ok: number;
  outcomes: string[];
  totalMs: number | null;
  blackoutMs: number | null;
  qemuDowntimeMs: number | null;
  fwdMiB: number | null;
  backMiB: number | null;
  checkpoints: number | null;
  checkpointMiB: number | null;
  trulyDirtiedMiB: number | null;
  /** Σ checkpoint bytes / Σ truly dirtied bytes over the runs. */
  ckptOverDirtied: number | null;
  guestRate: number | null;
  baselineRate: number | null;
  /** Over all checkpoints of all runs (pooled). */
  pause: Record<keyof PauseSplit, { p50: number | null; p99: number | null; max: number | null }> | null;
  heldMax: number | null;
}

/** A run counts when it completed and nothing failed after (e.g. the guest died on the destination). */
export const good = (r: Run): boolean => r.ok && !r.error;
export const outcomeOf = (r: Run): string =>
  good(r)
    ? r.outcome
    : r.ok
      ? `completed, then ${(r.error ?? '')
          .split('\n')[0]!
          .replace(/^Error: /, '')
          .slice(0, 80)}`
      : r.outcome;

export function stats(key: string, runs: Run[]): CellStats {
  const ok = runs.filter(good);
  const pool = ok.flatMap((r) => r.pauses);
  const split = (k: keyof PauseSplit) => {
    const v = pool.map((p) => p[k]);
    return { p50: pct(v, 50), p99: pct(v, 99), max: v.length ? Math.max(...v) : null };
  };
  const withDirt = ok.filter((r) => r.trulyDirtiedBytes !== null && r.checkpointBytes !== null);
  const dirt = withDirt.reduce((s, r) => s + r.trulyDirtiedBytes!, 0);
  const ck = withDirt.reduce((s, r) => s + r.checkpointBytes!, 0);
  return {
    key,
    cell: runs[0]!.cell,
    n: runs.length,
    ok: ok.length,
    outcomes: runs.map(outcomeOf),
    totalMs: med(ok.map((r) => r.totalMs)),
    blackoutMs: med(ok.map((r) => r.blackoutMs)),
    qemuDowntimeMs: med(ok.map((r) => r.qemuDowntimeMs)),
    fwdMiB: med(ok.map((r) => (r.linkBytes ? r.linkBytes.fwd / MiB : null))),
    backMiB: med(ok.map((r) => (r.linkBytes ? r.linkBytes.back / MiB : null))),
    checkpoints: med(ok.map((r) => (r.cell.strategy.startsWith('tether') ? r.checkpoints : null))),
    checkpointMiB: med(ok.map((r) => (r.checkpointBytes !== null ? r.checkpointBytes / MiB : null))),
    trulyDirtiedMiB: med(ok.map((r) => (r.trulyDirtiedBytes !== null ? r.trulyDirtiedBytes / MiB : null))),
    ckptOverDirtied: dirt > 0 ? r2(ck / dirt) : null,
    guestRate: med(ok.map((r) => r.guestRate)),
    baselineRate: med(ok.map((r) => r.baselineRate)),
    pause: pool.length
      ? { stop: split('stop'), scan: split('scan'), devstate: split('devstate'), cont: split('cont'), total: split('total') }
      : null,
    heldMax: med(ok.map((r) => r.heldMax)),
  };
}

/** Statistics of every cell that has runs, in the order of the plan `planned` (others last). */
export function cellStats(runs: Run[], planned: Cell[]): CellStats[] {
  const keys = [...new Set(runs.map((r) => r.key))];
  const order = (k: string) => {
    const i = planned.findIndex((c) => cellKey(c) === k);
    return i < 0 ? 1000 : i;
  };
  keys.sort((a, b) => order(a) - order(b));
  return keys.map((k) =>
    stats(
      k,
      runs.filter((r) => r.key === k),
    ),
  );
}

// ------------------------------------------------------------------ report

export function fmt(v: number | null | undefined, digits = 0): string {
  return v === null || v === undefined ? '–' : v.toFixed(digits);
}

export function runsTable(all: CellStats[]): string {
  const L = [
    '| part | strategy | workload | RAM | link | ok/n | total ms | blackout ms | QEMU downtime ms | fwd MiB | back MiB | ckpts | ckpt MiB | truly dirtied MiB | ckpt/dirtied | guest pages/s (post-copy) | undisturbed pages/s | pause p50/p99/max ms | p50 stop/scan/dev/cont ms | held frames max |',
    '|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|',
  ];
  for (const s of all) {
    const p = s.pause;
    L.push(
      `| ${s.cell.part} | ${s.cell.strategy} | ${s.cell.workload} | ${s.cell.ramMiB} | ${s.cell.link} | ${s.ok}/${s.n}${s.ok < s.n ? ` (${[...new Set(s.outcomes.filter((o) => o !== 'completed'))].join('; ')})` : ''} | ` +
        `${fmt(s.totalMs)} | ${fmt(s.blackoutMs)} | ${fmt(s.qemuDowntimeMs)} | ${fmt(s.fwdMiB, 1)} | ${fmt(s.backMiB, 1)} | ${fmt(s.checkpoints)} | ${fmt(s.checkpointMiB, 1)} | ` +
        `${fmt(s.trulyDirtiedMiB, 1)} | ${fmt(s.ckptOverDirtied, 2)} | ${fmt(s.guestRate)} | ${fmt(s.baselineRate)} | ` +
        `${p ? `${fmt(p.total.p50, 1)}/${fmt(p.total.p99, 1)}/${fmt(p.total.max, 1)}` : '–'} | ` +
        `${p ? `${fmt(p.stop.p50, 1)}/${fmt(p.scan.p50, 1)}/${fmt(p.devstate.p50, 1)}/${fmt(p.cont.p50, 1)}` : '–'} | ${fmt(s.heldMax)} |`,
    );
  }
  return L.join('\n');
}

/** The figures the suite reports against its targets (issue 8), from every part of the run. */
export function targetFigures(all: CellStats[], x: Extras): Figure[] {
  const tethers = all.filter((s) => s.cell.strategy.startsWith('tether'));
  return [...comparisonFigures(all, tethers), ...floorFigures(tethers, x.floors), ...rollbackFigures(x.rollback), ...microTargetFigures(x)];
}

const ratio = (a: number | null | undefined, b: number | null | undefined) => (a != null && b != null && b > 0 ? r2(a / b) : null);

/** tether against vanilla post-copy in the same cell, and checkpoint bytes against truly dirtied. */
function comparisonFigures(all: CellStats[], tethers: CellStats[]): Figure[] {
  const F: Figure[] = [];
  const find = (strategy: Strategy, workload: Workload, ramMiB: number, link: Link) =>
    all.find((s) => s.key === cellKey({ strategy, workload, ramMiB, link }));
  // Comparisons at the grid's workload (and every other cell that has a vanilla post-copy twin).
  for (const t of tethers) {
    const v = find('vanilla-postcopy', t.cell.workload, t.cell.ramMiB, t.cell.link);
    if (!v) continue;
    const where = `${t.cell.workload}, ${t.cell.ramMiB} MiB, ${t.cell.link}`;
    F.push({
      name: `total time ${t.cell.strategy} / vanilla post-copy (${where})`,
      value: ratio(t.totalMs, v.totalMs),
      unit: '×',
      target: { op: '<=', value: 1.05 },
      note: `${fmt(t.totalMs)} / ${fmt(v.totalMs)} ms, medians of ${t.ok} / ${v.ok}`,
    });
    if (isMemcheck(t.cell.workload)) {
      F.push({
        name: `guest progress in post-copy ${t.cell.strategy} / vanilla post-copy (${where})`,
        value: ratio(t.guestRate, v.guestRate),
        unit: '×',
        target: { op: '>=', value: 0.8 },
        note: `${fmt(t.guestRate)} / ${fmt(v.guestRate)} memcheck pages/s (undisturbed ${fmt(t.baselineRate)} / ${fmt(v.baselineRate)})`,
      });
    }
    F.push({
      name: `switchover blackout ${t.cell.strategy} / vanilla QEMU downtime (${where})`,
      value: ratio(t.blackoutMs, v.qemuDowntimeMs),
      unit: '×',
      target: { op: '<=', value: 2 },
      note: `${fmt(t.blackoutMs)} ms / ${fmt(v.qemuDowntimeMs)} ms; vanilla blackout measured like tether's: ${fmt(v.blackoutMs)} ms (${fmt(ratio(t.blackoutMs, v.blackoutMs), 2)}×)`,
    });
  }
  for (const t of tethers.filter((s) => isMemcheck(s.cell.workload))) {
    F.push({
      name: `checkpoint bytes / truly dirtied (${t.cell.strategy}, ${t.cell.workload}, ${t.cell.ramMiB} MiB, ${t.cell.link})`,
      value: t.ckptOverDirtied,
      unit: '×',
      target: { op: '<=', value: 1.1 },
      note: `${fmt(t.checkpointMiB, 1)} MiB sent back vs ${fmt(t.trulyDirtiedMiB, 1)} MiB dirtied (medians)`,
    });
  }
  return F;
}

/** The scan pause against the native hashing floor of the same RAM size. */
function floorFigures(tethers: CellStats[], floors: HashFloor[]): Figure[] {
  const F: Figure[] = [];
  for (const floor of floors) {
    const ram = floor.bytes / MiB;
    const ts = tethers.filter((s) => s.cell.ramMiB === ram && s.pause);
    const scanMax = ts.length ? Math.max(...ts.map((s) => s.pause!.scan.max ?? 0)) : null;
    const scanP50 = med(ts.map((s) => s.pause!.scan.p50));
    F.push({
      name: `scan pause max / hashing floor, ${ram} MiB`,
      value: ratio(scanMax, floor.ms),
      unit: '×',
      target: { op: '<=', value: 2 },
      note: `scan max ${fmt(scanMax, 1)} ms (p50 ${fmt(scanP50, 1)} ms) over ${ts.reduce((n, s) => n + s.ok, 0)} tether runs; floor ${floor.ms} ms (native hashFile, ${floor.threads} threads)`,
    });
  }
  return F;
}

/** Restore and detect times of the rollback part (bench migrate --only rollback). */
function rollbackFigures(rb: Rec | null): Figure[] {
  const F: Figure[] = [];
  if (rb) {
    const runs = (rb.rollback?.runs ?? []) as Rec[];
    for (const st of (rb.rollback?.stats ?? []) as Rec[]) {
      const what = st.standby === 'hot' ? 'hot standby' : 'fresh QEMU (cold)';
      const mine = runs.filter((r) => r.standby === st.standby && r.outcome === 'rolled-back' && r.rollback);
      const detect = mine.map((r) => Number(r.rollback.detectMs));
      F.push({
        name: `restore p50, ${what}`,
        value: st.restoreMs?.p50 ?? null,
        unit: 'ms',
        target: { op: '<=', value: 60 },
        note: `n=${st.n} (hot used ${st.hot}×); p99 ${fmt(st.restoreMs?.p99, 1)} ms; kill ${fmt(st.killMs, 1)}, start/load ${fmt(st.startMs, 1)}, announce ${fmt(st.announceMs, 1)} ms`,
      });
      F.push({
        name: `rollback detect p50 / p99, ${what}`,
        value: pct(detect, 50),
        unit: 'ms',
        note: `p99 ${fmt(pct(detect, 99), 1)} ms; interrupts: ${[...new Set(mine.map((r) => r.kind))].join(', ')}`,
      });
    }
  } else {
    F.push({ name: 'restore p50 (rollback)', value: null, unit: 'ms', target: { op: '<=', value: 60 }, note: 'not measured in this run' });
  }
  return F;
}

/** Gate and journal throughput from the micro benches' JSON (this run's or an earlier one). */
function microTargetFigures(x: Extras): Figure[] {
  const F: Figure[] = [];
  const from = (fresh: boolean, j: Rec) => (fresh ? 'this run' : `an earlier run, ${String(j.date ?? 'undated')}`);
  const gateRows = (x.gate?.rows ?? []) as Rec[];
  for (const mode of ['gated', 'pass']) {
    const r = gateRows.find((g) => String(g.test).startsWith('gate') && String(g.method).includes(mode) && g.frameBytes === 1500);
    F.push({
      name: `gate throughput, ${mode === 'gated' ? 'held + released every 25 ms' : 'pass-through'}, 1500-byte frames`,
      value: r ? Number(r.mbitPerS) : null,
      unit: 'Mbit/s',
      note:
        r && x.gate
          ? `bench gate (${from(x.gateFresh, x.gate)}), synthetic frame source; ${r.framesPerS} frames/s`
          : 'not measured in this run (`npm run bench gate`)',
    });
  }
  F.push({
    name: 'frame latency through the gate',
    value: null,
    unit: 'ms',
    note: 'not measured in this run (needs `bench net`, on another branch); the net workload reports the held-frames timeline instead',
  });
  const jRows = (x.journal?.rows ?? []) as Rec[];
  for (const w of ['seq', 'rand']) {
    const raw = jRows.find((r) => String(r.workload).startsWith(w) && r.device === 'raw');
    const jr = jRows.find((r) => String(r.workload).startsWith(w) && r.device === 'journaled');
    F.push({
      name: `journal throughput, ${w === 'seq' ? 'sequential 64 KiB' : 'random 4 KiB'} writes`,
      value: jr ? Number(jr.mibPerS) : null,
      unit: 'MiB/s',
      note:
        jr && raw && x.journal
          ? `bench journal (${from(x.journalFresh, x.journal)}); raw file ${raw.mibPerS} MiB/s (${r2(jr.mibPerS / raw.mibPerS)}×)`
          : 'not measured in this run (`npm run bench journal`)',
    });
  }
  return F;
}

/** Figures of the micro benches, lifted from their JSON (whatever numeric summary they carry). */
export function microFigures(name: string, j: Rec | null, fresh: boolean): string[] {
  const rows = (j?.rows ?? []) as Rec[];
  if (!j || !rows.length) return [];
  const cols = Object.keys(rows[0]!);
  return [
    `### ${name} (${fresh ? 'this run' : `an earlier run, ${String(j.date ?? 'undated')}`})`,
    '',
    `| ${cols.join(' | ')} |`,
    `|${cols.map(() => '---').join('|')}|`,
    ...rows.map((r) => `| ${cols.map((c) => String(r[c] ?? '')).join(' | ')} |`),
  ];
}

// ------------------------------------------------------------------ summary

/** What an earlier report of this run's folder says (--report-only describes the run that measured). */
export interface EarlierReport {
  hashFloors?: HashFloor[];
  command?: string;
  durationMs?: number;
  date?: string;
}

export function readEarlier(): EarlierReport {
  try {
    return JSON.parse(fs.readFileSync(path.join(RUN_DIR, 'suite.json'), 'utf8')) as EarlierReport;
  } catch {
    return {}; // none: a first report of this folder
  }
}

export interface SuiteResult {
  runs: Run[];
  all: CellStats[];
  x: Extras;
  planLines: string[];
  plots: string[];
  /** when main() started (now()), for the duration */
  t0: number;
  earlier: EarlierReport;
}

/** Figures against targets, including the guest's own verdicts over every run. */
export function summaryFigures(res: SuiteResult): { figs: Figure[]; corrupt: number; failed: Run[] } {
  const { runs } = res;
  const corrupt = runs.reduce((n, r) => n + r.memcheck.reduce((m, c) => m + c.corrupt, 0), 0);
  const netViol = runs.reduce((n, r) => n + (r.net?.violations ?? 0), 0);
  const figs = targetFigures(res.all, res.x);
  figs.push({ name: 'memcheck CORRUPT lines, all serial logs', value: corrupt, unit: '', target: { op: '<=', value: 0 } });
  if (runs.some((r) => r.net))
    figs.push({ name: 'netcheck violations (net workload)', value: netViol, unit: '', target: { op: '<=', value: 0 } });
  return { figs, corrupt, failed: runs.filter((r) => r.error) };
}

/** The run's command, duration and date: --report-only takes them from the run that measured. */
function provenance(res: SuiteResult): { command: string; durationMs: number; started: string } {
  const e = res.earlier;
  const command = reportOnly && e.command ? e.command : `npm run bench -- ${process.argv.slice(2).join(' ')}`.trim().replace(/ --$/, '');
  const durationMs = reportOnly && e.durationMs ? e.durationMs : r2(now() - res.t0);
  const started = reportOnly && e.date ? e.date : STARTED;
  return { command, durationMs, started };
}

function summaryMarkdown(res: SuiteResult, figs: Figure[], failed: Run[]): string {
  const { command, started } = provenance(res);
  const { all, x } = res;
  const load = os
    .loadavg()
    .map((l) => l.toFixed(2))
    .join(' ');
  return [
    `# Benchmark suite${quick ? ' (quick: CI smoke, figures not meaningful)' : ''}, ${started}`,
    '',
    `\`${command}\` — QEMU TCG, ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), load average ${load} at the end; other work may share the machine.`,
    '',
    '## Plan',
    '',
    '```',
    ...res.planLines,
    '```',
    '',
    '## Targets (issue 8)',
    '',
    markdownTable(figs),
    '',
    'PASS/MISS are findings about this run, not test failures.',
    '',
    '## Every cell (medians over its runs; pauses pooled over all checkpoints of its runs)',
    '',
    runsTable(all),
    '',
    ...microFigures('bench journal', x.journal, x.journalFresh),
    '',
    ...microFigures('bench gate', x.gate, x.gateFresh),
    '',
    '## Definitions',
    '',
    `- ${BLACKOUT_NOTE}`,
    `- ${TRULY_DIRTIED_NOTE}`,
    `- ${PROGRESS_NOTE}`,
    `- ${PRECOPY_NOTE}`,
    '- total: tether from the migrate request in the source daemon to completed (destination QEMU start included); vanilla from spawning the destination QEMU to the source query-migrate `completed` (10 ms polls).',
    '- bytes each way: the source end of the migration veth, tx (forward) and rx (back) during the migration: all traffic, QEMU stream and tether peer channel.',
    '- pause split: stop (QMP stop), scan (dirty collection and page copy), devstate (device state save and disk seal), cont (QMP cont).',
    ...(failed.length
      ? ['', '## Runs that failed', '', ...failed.map((r) => `- ${r.key}-r${r.repeat}: ${(r.error ?? '').split('\n')[0]}`)]
      : []),
    '',
  ].join('\n');
}

function suiteJson(res: SuiteResult, figs: Figure[], corrupt: number, failed: Run[]): Record<string, unknown> {
  const { command, durationMs, started } = provenance(res);
  const { x } = res;
  return {
    bench: 'suite',
    date: started,
    durationMs,
    command,
    quick,
    plan: res.planLines,
    host: {
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model,
      kernel: os.release(),
      node: process.version,
      qemu: qemuVersion(),
      loadavg: os.loadavg(),
    },
    options: { ...opt, parts: [...opt.parts] },
    notes: [BLACKOUT_NOTE, TRULY_DIRTIED_NOTE, PROGRESS_NOTE, PRECOPY_NOTE],
    targets: figs,
    cells: res.all,
    hashFloors: x.floors,
    rollback: x.rollback ? { stats: x.rollback.rollback?.stats ?? null, date: x.rollback.date } : null,
    corruptTotal: corrupt,
    failedRuns: failed.map((r) => `${r.key}-r${r.repeat}`),
    plots: res.plots,
    runFiles: fs.readdirSync(RUNS_DIR).sort(),
  };
}

/** Write suite.json and summary.md into the run's folder and the latest copies under bench-results/, and print the summary. */
export function writeReport(res: SuiteResult): { corrupt: number; failed: Run[] } {
  const { figs, corrupt, failed } = summaryFigures(res);
  const md = summaryMarkdown(res, figs, failed);
  const jsonText = JSON.stringify(suiteJson(res, figs, corrupt, failed), null, 1) + '\n';
  fs.writeFileSync(path.join(RUN_DIR, 'suite.json'), jsonText);
  fs.writeFileSync(
    path.join(RUN_DIR, 'summary.md'),
    md +
      res.plots
        .filter((p) => p.startsWith('compare'))
        .map((p) => `\n![${p}](${p})\n`)
        .join(''),
  );
  fs.writeFileSync(path.join(OUT_DIR, quick ? 'suite-quick.json' : 'suite.json'), jsonText);
  fs.writeFileSync(path.join(OUT_DIR, quick ? 'suite-quick.md' : 'suite.md'), md);
  console.log(md);
  console.log(
    `wrote ${RUN_DIR}/ (suite.json, summary.md, runs/, ${res.plots.length} SVG plots, logs/) in ${((now() - res.t0) / 1000).toFixed(1)} s`,
  );
  return { corrupt, failed };
}

function qemuVersion(): string {
  try {
    return execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0] ?? '';
  } catch {
    return '';
  }
}
