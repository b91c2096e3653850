/**
 * The plot of `npm run bench apps`: requests (memcached, nginx) and commits (PostgreSQL)
 * per second before, during and after the post-copy window, tether beside vanilla QEMU
 * post-copy, one panel per workload and migration link. The y axes are logarithmic:
 * inside the window tether's closed-loop rates are one to two orders of magnitude below.
 */
import type { TopLevelSpec } from 'vega-lite';

/** What the plot reads of a run (the `runs` of bench-results/apps.json). */
export interface PlotRun {
  strategy: string;
  link: string;
  ok: boolean;
  stats: Partial<Record<string, Partial<Record<string, { perSecond: number | null }>>>>;
}

const PHASES = ['before', 'during', 'after'];

export function appsThroughputSpec(runs: readonly PlotRun[], title: string): TopLevelSpec {
  const values: { workload: string; link: string; strategy: string; phase: string; perSecond: number }[] = [];
  for (const r of runs) {
    if (!r.ok) continue;
    for (const [workload, phases] of Object.entries(r.stats)) {
      for (const phase of PHASES) {
        const v = phases?.[phase]?.perSecond;
        // a phase with nothing completed has no bar on a log axis; say so by its absence
        if (typeof v === 'number' && v > 0) values.push({ workload, link: r.link, strategy: r.strategy, phase, perSecond: v });
      }
    }
  }
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title,
    data: { values },
    facet: {
      row: { field: 'link', type: 'nominal', title: 'migration link' },
      column: { field: 'workload', type: 'nominal', title: null },
    },
    spec: {
      width: 180,
      height: 140,
      mark: 'bar',
      encoding: {
        x: { field: 'phase', type: 'nominal', sort: PHASES, title: null },
        xOffset: { field: 'strategy', type: 'nominal' },
        y: { field: 'perSecond', type: 'quantitative', scale: { type: 'log' }, title: 'completed per second (log)' },
        color: { field: 'strategy', type: 'nominal', title: null },
        tooltip: [{ field: 'perSecond', type: 'quantitative', format: '.1f' }],
      },
    },
    resolve: { scale: { y: 'independent' } },
  };
}
