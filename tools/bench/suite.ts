/**
 * Benchmark suite: `npm run bench` (full) and `npm run bench -- --quick` (CI smoke).
 *
 * Strategies side by side, each migration in its own two-namespace Cluster (lab/cluster.ts:
 * real QEMU TCG, a tether daemon per namespace), the migration link veth shaped
 * with tbf in both directions:
 *   vanilla-precopy    QEMU pre-copy, started directly in the namespaces (no tether); guest
 *                      RAM 8 KiB over the stated size (PRECOPY_NOTE: QEMU 7.2 loses TCG dirty bits)
 *   vanilla-postcopy   QEMU post-copy (migrate, then migrate-start-postcopy at once)
 *   tether-25/50/100   tether at that checkpoint interval (ms)
 * Workloads: idle (the guest sleeps), mc25 / mc75 (memcheck over 25 % / 75 % of RAM at
 * --memcheck-rate MB/s), net (netcheck conversation through the gate, the guest otherwise
 * idle; vanilla uses a plain QEMU TAP), disk (diskcheck writes through the journal; tether
 * only: the disk is served by the sidecar).
 *
 * A full factorial is far too slow on a 2-core TCG machine, so the plan (printed into every
 * output) is three parts plus two reused benches:
 *   grid      strategy × link (1gbit, 200mbit) at 512 MiB, mc25, --repeats runs each
 *   ram       vanilla-postcopy vs tether-50 at 1 GiB and 2 GiB, mc25, 1gbit, --ram-repeats
 *   workload  vanilla-postcopy and tether-50 over idle, mc75, net, disk at 512 MiB, 1gbit
 *             (mc25 at 1gbit is in the grid), --workload-repeats
 *   rollback  `bench migrate --only rollback`: repeated interrupted migrations, hot standby
 *             vs a fresh QEMU (restore / detect p50/p99)
 *   micro     `bench gate` and `bench journal` (frame path and journal throughput)
 *
 * Per run: total time, switchover blackout (guest not running: source STOP → destination
 * running, see BLACKOUT_NOTE), QEMU's reported downtime (vanilla), bytes each way on the link,
 * checkpoint pauses split stop/scan/devstate/cont, checkpoint bytes vs truly dirtied bytes
 * (TRULY_DIRTIED_NOTE), guest progress in the post-copy window (memcheck pages/s from the
 * guest's own progress lines, timestamped as they reach the serial log).
 *
 * Output: bench-results/suite-<time>/ (suite.json, runs/*.json one per migration,
 * summary.md, timeline-*.svg per migration, compare-*.svg, logs/), and the latest at
 * bench-results/suite.json and suite.md.
 *
 * Options (defaults; quick in brackets):
 *   --quick                 CI smoke: 256 MiB guest, one run of each strategy, every workload
 *                           and output path once; figures are not meaningful
 *   --parts grid,ram,workload,rollback,micro    run a subset (pieces of a full run)
 *   --dir <path>            add to an earlier run's folder: runs already there are kept
 *   --report-only           with --dir: no measuring, rebuild the report from the runs there
 *   --repeats 3 [1]         runs per grid cell (medians)
 *   --ram-repeats 1         runs per RAM-sweep cell
 *   --workload-repeats 1    runs per workload cell
 *   --memcheck-rate 64      memcheck MB/s (0 = unthrottled)
 *   --precopy-deadline-s 30 [15]  vanilla pre-copy that has not converged by then is cancelled
 *   --rollback-repeats 5    interrupted migrations per standby mode
 *
 * Modules: suite/plan.ts (options, notes, the cells), suite/run.ts (one migration measured, the
 * reused benches), suite/observe.ts (what a run watches), suite/report.ts (statistics, figures,
 * suite.json and summary.md), suite/plots.ts (SVGs). This file runs them in order.
 */
import fs from 'node:fs';
import { log, now, type Rec } from './lib.ts';
import { ALL_PARTS, cellKey, LOG_DIR, opt, plan, planText, quick, reportOnly, RUNS_DIR, type Cell, type Part } from './suite/plan.ts';
import { writePlots } from './suite/plots.ts';
import { cellStats, readEarlier, writeReport } from './suite/report.ts';
import { reusedBenches } from './suite/reused.ts';
import { loadRuns, measureFloors, runTether, runVanilla } from './suite/run.ts';
import path from 'node:path';

/** Measure every cell's `repeat`-th run that the folder does not hold yet (none with --report-only). */
async function measure(cells: Cell[], repeat: number, done: Set<string>): Promise<void> {
  for (const cell of cells) {
    const id = `${cellKey(cell)}-r${repeat}`;
    if (reportOnly || repeat > cell.repeats || done.has(id)) continue;
    const run = cell.strategy.startsWith('tether') ? await runTether(cell, repeat) : await runVanilla(cell, repeat);
    fs.writeFileSync(path.join(RUNS_DIR, `${id}.json`), JSON.stringify(run, null, 1) + '\n');
  }
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('needs root (network namespaces)');
  const t0 = now();
  fs.mkdirSync(RUNS_DIR, { recursive: true });
  fs.mkdirSync(LOG_DIR, { recursive: true });
  const cells = plan(opt.parts);
  // The report describes the whole plan: a run in pieces (--parts, --dir) ends with all of it.
  const fullPlan = process.argv.includes('--dir') ? new Set<Part>(ALL_PARTS) : opt.parts;
  const planLines = planText(plan(fullPlan), fullPlan);
  log(`plan:\n  ${planLines.join('\n  ')}`);
  const done = new Set(loadRuns().map((r) => `${r.key}-r${r.repeat}`));
  // Breadth first: one run of every cell, then the reused benches, then the further repeats,
  // so that a run cut short (or resumed with --dir) still covers the whole plan.
  await measure(cells, 1, done);
  const x = await reusedBenches();
  for (let r = 2; r <= Math.max(0, ...cells.map((c) => c.repeats)); r++) await measure(cells, r, done);

  const runs = loadRuns();
  const all = cellStats(runs, plan(fullPlan));
  const rams = [...new Set(all.filter((s) => s.cell.strategy.startsWith('tether')).map((s) => s.cell.ramMiB))].sort((a, b) => a - b);
  const earlier = readEarlier();
  x.floors = await measureFloors(rams, earlier.hashFloors ?? []);
  const plots = await writePlots(all, runs, x);
  const { corrupt, failed } = writeReport({ runs, all, x, planLines, plots, t0, earlier });
  // A MISS is a finding, never a failure. The smoke (--quick, run by `npm test`) fails on any
  // migration that errored or any CORRUPT line: that is the rot it is there to catch. A full run
  // fails only when it produced no figures at all.
  const rollbackOk = !opt.parts.has('rollback') || ((x.rollback?.rollback?.stats ?? []) as Rec[]).some((st) => st.n > 0);
  if (quick ? failed.length > 0 || corrupt > 0 || !rollbackOk : runs.length > 0 && runs.every((r) => r.error)) {
    process.exitCode = 1;
    log(
      quick
        ? `smoke failed: ${failed.length} runs errored, ${corrupt} CORRUPT lines, rollback measured: ${rollbackOk}`
        : 'every migration failed',
    );
  }
}

await main();
