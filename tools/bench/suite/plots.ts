/**
 * The suite's SVG plots (tools/bench/report.ts renders them): a timeline per migration and
 * the comparisons of the cells (time, blackout, progress, bytes, pauses, RAM, workloads, restore).
 */
import type { TopLevelSpec } from 'vega-lite';
import { log, type Rec } from '../lib.ts';
import { barsSpec, plotDir, timelineSpec } from '../report.ts';
import { GUEST_DEFAULT_MIB, quick, RUN_DIR } from './plan.ts';
import type { CellStats } from './report.ts';
import type { Extras } from './reused.ts';
import type { Run } from './run.ts';

type Put = (name: string, spec: TopLevelSpec) => Promise<void>;

const bars = (pick: (s: CellStats) => number | null, cells: CellStats[], group: (s: CellStats) => string) =>
  cells.flatMap((s) => {
    const v = pick(s);
    return v === null ? [] : [{ group: group(s), series: s.cell.strategy, value: v }];
  });

/** Write every plot into the run's folder; returns the files written. */
export async function writePlots(all: CellStats[], runs: Run[], x: Extras): Promise<string[]> {
  const { files, put } = plotDir(RUN_DIR, log);
  for (const r of runs) if (r.timeline) await put(`timeline-${r.key}-r${r.repeat}.svg`, timelineSpec(r.timeline));
  await gridPlots(all, put);
  await sweepPlots(all, x, put);
  return files;
}

/** The grid's cells (memcheck 25 %, default RAM) side by side, by link. */
async function gridPlots(all: CellStats[], put: Put): Promise<void> {
  const grid = all.filter((s) => s.cell.workload === (quick ? 'mc25' : 'mc25') && s.cell.ramMiB === GUEST_DEFAULT_MIB);
  const byLink = (s: CellStats) => s.cell.link;
  const rowsTotal = bars((s) => s.totalMs, grid, byLink);
  if (rowsTotal.length)
    await put(
      'compare-total.svg',
      barsSpec({ title: `Total migration time (memcheck 25 %, ${GUEST_DEFAULT_MIB} MiB)`, yTitle: 'ms (median)', rows: rowsTotal }),
    );
  const rowsBlack = bars((s) => s.blackoutMs, grid, byLink);
  if (rowsBlack.length)
    await put(
      'compare-blackout.svg',
      barsSpec({ title: 'Switchover blackout (guest running nowhere)', yTitle: 'ms (median)', rows: rowsBlack }),
    );
  const rowsProg = bars((s) => s.guestRate, grid, byLink);
  if (rowsProg.length)
    await put(
      'compare-progress.svg',
      barsSpec({ title: 'Guest progress in the post-copy window', yTitle: 'memcheck pages/s (median)', rows: rowsProg }),
    );
  const rowsBytes = grid.flatMap((s) =>
    s.fwdMiB === null
      ? []
      : [
          { group: `${s.cell.link} fwd`, series: s.cell.strategy, value: s.fwdMiB },
          { group: `${s.cell.link} back`, series: s.cell.strategy, value: s.backMiB ?? 0 },
        ],
  );
  if (rowsBytes.length)
    await put('compare-bytes.svg', barsSpec({ title: 'Bytes on the migration link', yTitle: 'MiB (median)', rows: rowsBytes }));
}

/** The pause split, the RAM and workload sweeps, and the restore times of the rollback part. */
async function sweepPlots(all: CellStats[], x: Extras, put: Put): Promise<void> {
  const rowsPause = all
    .filter((s) => s.pause && s.cell.workload === 'mc25')
    .flatMap((s) =>
      (['stop', 'scan', 'devstate', 'cont'] as const).map((k) => ({
        group: k,
        series: `${s.cell.strategy} ${s.cell.ramMiB}M ${s.cell.link}`,
        value: s.pause![k].p50 ?? 0,
      })),
    );
  if (rowsPause.length) await put('compare-pause.svg', barsSpec({ title: 'Checkpoint pause p50, split', yTitle: 'ms', rows: rowsPause }));
  const ramCells = all.filter(
    (s) => s.cell.workload === 'mc25' && s.cell.link === '1gbit' && ['vanilla-postcopy', 'tether-50'].includes(s.cell.strategy),
  );
  const rowsRam = bars(
    (s) => s.totalMs,
    ramCells,
    (s) => `${s.cell.ramMiB} MiB`,
  );
  if (rowsRam.length > 2)
    await put(
      'compare-ram.svg',
      barsSpec({ title: 'Total time by guest RAM (memcheck 25 %, 1 Gbit/s)', yTitle: 'ms (median)', rows: rowsRam }),
    );
  const wl = all.filter(
    (s) => s.cell.link === '1gbit' && s.cell.ramMiB === GUEST_DEFAULT_MIB && ['vanilla-postcopy', 'tether-50'].includes(s.cell.strategy),
  );
  const rowsWl = bars(
    (s) => s.totalMs,
    wl,
    (s) => s.cell.workload,
  );
  if (rowsWl.length > 2)
    await put('compare-workload.svg', barsSpec({ title: 'Total time by workload (1 Gbit/s)', yTitle: 'ms (median)', rows: rowsWl }));
  const rbStats = (x.rollback?.rollback?.stats ?? []) as Rec[];
  const rowsRb = rbStats.flatMap((st) =>
    st.restoreMs
      ? [
          { group: 'p50', series: st.standby === 'hot' ? 'hot standby' : 'fresh QEMU', value: st.restoreMs.p50 },
          { group: 'p99', series: st.standby === 'hot' ? 'hot standby' : 'fresh QEMU', value: st.restoreMs.p99 },
        ]
      : [],
  );
  if (rowsRb.length)
    await put(
      'compare-restore.svg',
      barsSpec({ title: 'Restore after a failure', yTitle: 'ms', rows: rowsRb, target: { value: 60, label: 'goal p50 60 ms' } }),
    );
}
