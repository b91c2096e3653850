/**
 * The migration benchmark's report: the console table, the figures beside their targets
 * (summary.md) and the SVG plots of one run.
 */
import os from 'node:os';
import { log, MiB, r2, type CorruptCheck, type HashFloor, type Rec } from '../lib.ts';
import { barsSpec, markdownTable, plotDir, timelineSpec, type Figure } from '../report.ts';
import type { TetherComplete, VanillaResult } from './complete.ts';
import { opt, rollbackVmNote } from './plan.ts';
import { median, type RollbackBench } from './rollback.ts';

export function fmtMs(v: number | null | undefined): string {
  return v === null || v === undefined || Number.isNaN(v) ? '-' : v >= 10_000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(1)} ms`;
}
export function fmtBytes(v: number | null | undefined): string {
  if (v === null || v === undefined) return '-';
  if (v >= MiB) return `${(v / MiB).toFixed(1)} MiB`;
  if (v >= 1024) return `${(v / 1024).toFixed(1)} KiB`;
  return `${v} B`;
}
export function row(label: string, ...cols: string[]): string {
  return `  ${label.padEnd(44)} ${cols.map((c) => c.padStart(14)).join(' ')}`;
}

const bwNote = (mib: number) => (mib > 0 ? `max-bandwidth ${mib} MiB/s` : 'QEMU default bandwidth');

/** The console table of a run (also the JSON's summary lines). */
export function report(res: {
  tether?: TetherComplete;
  vanilla?: VanillaResult;
  rollback?: RollbackBench;
  memcheck: CorruptCheck[];
}): string {
  const L: string[] = [];
  L.push(
    `guest ${opt.guestMiB} MiB, memcheck ${opt.memcheckMB} MB ${opt.memcheckRate > 0 ? `at ${opt.memcheckRate} MB/s` : 'unthrottled'}, checkpoint interval ${opt.intervalMs} ms, QEMU TCG`,
  );
  if (res.tether || res.vanilla) L.push(...completingTable(res.tether, res.vanilla));
  if (res.rollback) L.push(...rollbackTable(res.rollback));
  L.push('', 'memcheck verdict (serial logs)');
  for (const m of res.memcheck) L.push(`  ${m.log.padEnd(44)} passes ${String(m.passes).padStart(4)}  CORRUPT lines ${m.corrupt}`);
  const total = res.memcheck.reduce((s, m) => s + m.corrupt, 0);
  L.push(`  ${total === 0 ? 'no CORRUPT in any serial log' : `CORRUPT lines in total: ${total}`}`);
  return L.join('\n');
}

/** tether and vanilla QEMU side by side, the completing migrations. */
function completingTable(t: TetherComplete | undefined, v: VanillaResult | undefined): string[] {
  const L: string[] = [];
  L.push('', `Completing migration (${bwNote(opt.bandwidthMiB)} for both)`);
  L.push(row('', 'tether', 'vanilla QEMU'));
  const tr = t?.result ?? null;
  L.push(row('total (tether: request→done; vanilla: migrate→completed)', fmtMs(tr?.totalMs), fmtMs(v?.totalMs)));
  L.push(row('vanilla incl. destination QEMU start + setup', '', fmtMs(v?.totalInclDestinationSetupMs)));
  L.push(row('switchover (from start)', fmtMs(tr?.switchoverMs), fmtMs(v?.switchoverMs)));
  L.push(row('destination running (vanilla, from migrate)', '', fmtMs(v?.destinationRunningMs)));
  L.push(row('outcome', tr?.outcome ?? (t?.error ? 'error' : '-'), v ? (v.error ? 'error' : 'completed') : '-'));
  L.push(row('checkpoints', tr ? String(tr.checkpoints) : '-', 'n/a'));
  L.push(row('dirty tracker', tr?.tracker ?? '-', 'n/a'));
  L.push(row('VM pause per checkpoint p50', fmtMs(tr?.pauseMs?.p50), 'n/a'));
  L.push(row('VM pause per checkpoint p99', fmtMs(tr?.pauseMs?.p99), 'n/a'));
  L.push(row('VM pause per checkpoint max', fmtMs(tr?.pauseMs?.max), 'n/a'));
  L.push(row('bytes per checkpoint p50', fmtBytes(tr?.checkpointBytes?.p50), 'n/a'));
  L.push(row('bytes per checkpoint avg', fmtBytes(tr?.checkpointBytes?.avg), 'n/a'));
  L.push(row('bytes per checkpoint max', fmtBytes(tr?.checkpointBytes?.max), 'n/a'));
  L.push(row('checkpoint bytes total (D→S)', fmtBytes(tr?.checkpointBytes?.total), 'n/a'));
  const qs = v?.qemuStats as Rec | null | undefined;
  L.push(row('QEMU stream bytes (vanilla ram.transferred)', '', fmtBytes(qs?.ram?.transferred)));
  L.push(
    row('QEMU downtime / postcopy-requests (vanilla)', '', qs ? `${qs.downtime ?? '-'} ms / ${qs.ram?.['postcopy-requests'] ?? '-'}` : '-'),
  );
  L.push(row('memcheck passes on D after migration', t ? String(t.passesAfter.length) : '-', v ? String(v.passesAfter.length) : '-'));
  if (t?.digest.checkpoints.length) {
    const pages = t.digest.checkpoints.map((c) => c.pages);
    L.push(
      `  tether checkpoint sizes over time (pages): first ${pages.slice(0, 5).join(', ')} … last ${pages.slice(-5).join(', ')}; max ${Math.max(...pages)}`,
    );
  }
  if (t?.error) L.push(`  tether error: ${t.error.split('\n')[0]}`);
  if (v?.error) L.push(`  vanilla error: ${v.error.split('\n')[0]}`);
  return L;
}

/** One line per interrupted migration, then the restore statistics per standby mode. */
function rollbackTable(rb: RollbackBench): string[] {
  const L: string[] = [];
  L.push(
    '',
    `Rollback mid post-copy (${rollbackVmNote()}; ${bwNote(opt.rollbackBandwidthMiB)}; interrupt once checkpoint ≥ ${opt.interruptEpoch} applied)`,
  );
  L.push(
    `  ${'interrupt'.padEnd(28)} ${['outcome', 'reason', 'ckpt@int', 'resumed', 'detect', 'restore', 'kill', 'start', 'announce', 'int→result'].map((s) => s.padStart(12)).join(' ')}`,
  );
  for (const r of rb.runs) {
    const label = `${r.standby} ${r.kind}`.padEnd(28);
    if (r.error) {
      L.push(`  ${label} error: ${r.error.split('\n')[0]}`);
      continue;
    }
    const f = r.rollback;
    L.push(
      `  ${label} ${[
        `${r.outcome ?? '-'}${f?.hot ? '*' : ''}`,
        (r.reason ?? '-').slice(0, 12),
        String(r.appliedAtInterrupt ?? '-'),
        String(r.resumedEpoch ?? '-'),
        fmtMs(f?.detectMs),
        fmtMs(f?.restoreMs),
        fmtMs(f?.killMs),
        fmtMs(f?.startMs),
        fmtMs(f?.announceMs),
        fmtMs(r.interruptToResultMs),
      ]
        .map((s) => s.padStart(12))
        .join(' ')}`,
    );
  }
  for (const st of rb.stats) {
    L.push(
      `  restore ${st.standby}: n=${st.n} (hot standby used ${st.hot}), p50 ${fmtMs(st.restoreMs?.p50)}, p99 ${fmtMs(st.restoreMs?.p99)}, ` +
        `max ${fmtMs(st.restoreMs?.max)}; medians kill ${fmtMs(st.killMs)}, start/load ${fmtMs(st.startMs)}, announce ${fmtMs(st.announceMs)}`,
    );
  }
  L.push('  * = the hot standby took over (else a fresh QEMU was started)');
  if (rb.checkpointConfig) L.push(`  VM checkpoint config: ${JSON.stringify(rb.checkpointConfig)}`);
  L.push(
    '  detect: last message from D → rollback decision; restore: decision → VM running on S (kill + start + announce); int→result includes the `tether abort` CLI start',
  );
  return L;
}

export type Results = {
  tether?: TetherComplete;
  vanilla?: VanillaResult;
  rollback?: RollbackBench;
  hashFloor?: HashFloor;
  memcheck: CorruptCheck[];
};

/** Figures beside the issue's targets. PASS/MISS are findings about this run, not test failures. */
export function figures(res: Results): Figure[] {
  const F: Figure[] = [];
  const tr = res.tether?.result;
  const v = res.vanilla;
  const bw = opt.bandwidthMiB > 0 ? `${opt.bandwidthMiB} MiB/s` : 'unthrottled';
  if (tr || v) {
    F.push({
      name: `tether total time (${bw})`,
      value: tr?.totalMs ?? null,
      unit: 'ms',
      note: 'request → completed, incl. destination QEMU start',
    });
    F.push({
      name: `vanilla post-copy total time (${bw})`,
      value: v?.totalInclDestinationSetupMs ?? null,
      unit: 'ms',
      note: 'incl. destination QEMU start + setup',
    });
    const ratio = tr && v && !v.error && v.totalInclDestinationSetupMs > 0 ? r2(tr.totalMs / v.totalInclDestinationSetupMs) : null;
    F.push({ name: `total time, tether / vanilla post-copy (${bw})`, value: ratio, unit: '×', target: { op: '<=', value: 1.05 } });
    F.push({
      name: 'checkpoint pause p50',
      value: tr?.pauseMs?.p50 ?? null,
      unit: 'ms',
      note: `${tr?.checkpoints ?? 0} checkpoints, tracker ${tr?.tracker ?? '-'}`,
    });
    F.push({ name: 'checkpoint pause p99', value: tr?.pauseMs?.p99 ?? null, unit: 'ms' });
    const collect = res.tether?.digest.checkpoints.map((c) => c.collectMs) ?? [];
    const floor = res.hashFloor;
    const scanP50 = median(collect);
    F.push({
      name: `scan (collect) p50 / hashing floor of ${opt.guestMiB} MiB`,
      value: scanP50 !== null && floor ? r2(scanP50 / floor.ms) : null,
      unit: '×',
      target: { op: '<=', value: 2 },
      note: floor
        ? `scan p50 ${scanP50 ?? '-'} ms; floor ${floor.ms} ms (native hashFile, ${floor.threads} threads); ` +
          'early checkpoints scan a partly populated RAM (post-copy holes are skipped): the p50 understates a full scan'
        : '',
    });
    const scanMax = collect.length ? Math.max(...collect) : null;
    F.push({
      name: `scan (collect) max / hashing floor of ${opt.guestMiB} MiB`,
      value: scanMax !== null && floor ? r2(scanMax / floor.ms) : null,
      unit: '×',
      target: { op: '<=', value: 2 },
      note: `scan max ${scanMax ?? '-'} ms: the scan of the most populated RAM, also the most contended`,
    });
    F.push({
      name: 'checkpoint bytes sent back (D→S), total',
      value: tr?.checkpointBytes ? r2(tr.checkpointBytes.total / MiB) : null,
      unit: 'MiB',
    });
    const qs = v?.qemuStats as Rec | null | undefined;
    F.push({
      name: 'vanilla QEMU downtime',
      value: typeof qs?.downtime === 'number' ? qs.downtime : null,
      unit: 'ms',
      note: 'QEMU query-migrate downtime',
    });
    // Blackout, guest progress and checkpoint bytes against truly dirtied bytes need the
    // per-run digests the suite keeps: `npm run bench` reports them.
  }
  for (const st of res.rollback?.stats ?? []) {
    const what = `${st.standby === 'hot' ? 'hot standby' : 'fresh QEMU (cold)'}${opt.rollbackVm === 'io' ? ', VM with NIC and disk' : ''}`;
    const note = `n=${st.n}, hot standby used ${st.hot}×; medians: kill ${st.killMs ?? '-'} ms, start/load ${st.startMs ?? '-'} ms`;
    F.push({ name: `restore p50, ${what}`, value: st.restoreMs?.p50 ?? null, unit: 'ms', target: { op: '<=', value: 60 }, note });
    F.push({ name: `restore p99, ${what}`, value: st.restoreMs?.p99 ?? null, unit: 'ms' });
  }
  const corrupt = res.memcheck.reduce((s, m) => s + m.corrupt, 0);
  F.push({ name: 'memcheck CORRUPT lines, all serial logs', value: corrupt, unit: '', target: { op: '<=', value: 0 } });
  return F;
}

export function summaryMarkdown(res: Results, command: string, started: string): string {
  const load = os
    .loadavg()
    .map((l) => l.toFixed(2))
    .join(' ');
  return [
    `# migrate benchmark, ${started}`,
    '',
    `\`${command}\` — guest 512 MiB, QEMU TCG, memcheck ${opt.memcheckMB} MB ${opt.memcheckRate > 0 ? `at ${opt.memcheckRate} MB/s` : 'unthrottled'}, ` +
      `checkpoint interval ${opt.intervalMs} ms, rollback link ${opt.rollbackBandwidthMiB} MiB/s; ${os.cpus().length} CPUs, load average ${load} at the end ` +
      '(other work shares this machine: figures are indicative).',
    '',
    markdownTable(figures(res)),
    '',
    'PASS/MISS compare this run with the targets of issue 8; they are findings, not test failures.',
  ].join('\n');
}

/** The plots of one run; returns their file names (relative to `dir`). */
export async function writePlots(dir: string, res: Results): Promise<string[]> {
  const { files, put } = plotDir(dir, log);
  if (res.tether?.timeline) await put('timeline-tether.svg', timelineSpec(res.tether.timeline));
  for (const [i, r] of (res.rollback?.runs ?? []).entries()) {
    if (r.timeline) await put(`timeline-rollback-${String(i + 1).padStart(2, '0')}-${r.standby}-${r.kind}.svg`, timelineSpec(r.timeline));
  }
  const tr = res.tether?.result;
  const v = res.vanilla;
  if (tr && v && !v.error) {
    await put(
      'compare-total.svg',
      barsSpec({
        title: `Total migration time (${opt.bandwidthMiB > 0 ? `${opt.bandwidthMiB} MiB/s` : 'unthrottled'})`,
        yTitle: 'ms',
        rows: [
          { group: 'total', series: 'tether', value: tr.totalMs },
          { group: 'total', series: 'vanilla post-copy', value: v.totalInclDestinationSetupMs },
        ],
      }),
    );
  }
  const rows = (res.rollback?.stats ?? []).flatMap((st) =>
    st.restoreMs
      ? [
          { group: 'p50', series: st.standby === 'hot' ? 'hot standby' : 'fresh QEMU', value: st.restoreMs.p50 },
          { group: 'p99', series: st.standby === 'hot' ? 'hot standby' : 'fresh QEMU', value: st.restoreMs.p99 },
        ]
      : [],
  );
  if (rows.length) {
    await put(
      'compare-restore.svg',
      barsSpec({
        title: 'Restore after a failure (decision → running + announce)',
        yTitle: 'ms',
        rows,
        target: { value: 60, label: 'goal p50 60 ms' },
      }),
    );
  }
  return files;
}
