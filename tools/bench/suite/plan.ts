/**
 * The suite's plan: its options (from the command line), where it writes, the notes that
 * define its figures, and the cells it measures (strategy × workload × RAM × link, with
 * repeats). No measuring here: tools/bench/suite/run.ts runs a cell, report.ts sums up.
 */
import path from 'node:path';
import { ROOT } from '../../../lab/topology.ts';
import { num, str } from '../args.ts';
import { MiB, type Link } from '../lib.ts';

export const quick = process.argv.includes('--quick');
/** Only rebuild the report from the runs already in --dir (e.g. after a run was cut short). */
export const reportOnly = process.argv.includes('--report-only');
export const ALL_PARTS = ['grid', 'ram', 'workload', 'rollback', 'micro'] as const;
export type Part = (typeof ALL_PARTS)[number];
export const opt = {
  quick,
  parts: new Set(str('parts', ALL_PARTS.join(',')).split(',')) as Set<Part>,
  repeats: num('repeats', quick ? 1 : 3),
  ramRepeats: num('ram-repeats', 1),
  workloadRepeats: num('workload-repeats', 1),
  memcheckRate: num('memcheck-rate', 64),
  precopyDeadlineS: num('precopy-deadline-s', quick ? 15 : 30),
  rollbackRepeats: num('rollback-repeats', quick ? 1 : 5),
};
for (const p of opt.parts) if (!(ALL_PARTS as readonly string[]).includes(p)) throw new Error(`unknown --parts entry ${p}`);

export const OUT_DIR = path.join(ROOT, 'bench-results');
export const STARTED = new Date().toISOString();
export const RUN_DIR = process.argv.includes('--dir')
  ? path.resolve(str('dir', ''))
  : path.join(OUT_DIR, `suite${quick ? '-quick' : ''}-${STARTED.replaceAll(':', '').replace(/\.\d+Z$/, 'Z')}`);
export const LOG_DIR = path.join(RUN_DIR, 'logs');
export const RUNS_DIR = path.join(RUN_DIR, 'runs');
/** QEMU's max-bandwidth for every strategy: far above both links, so tbf is what limits. */
export const UNLIMITED_BW = 10 * 1024 * MiB;
export const VANILLA_PORT = 49_200;
/** Deadlines only keep a broken run from hanging; they are not performance limits. */
export const MIGRATE_DEADLINE_MS = 600_000;
export const GUEST_DEFAULT_MIB = quick ? 256 : 512;

export const BLACKOUT_NOTE =
  'switchover blackout = guest not running on either host around switchover. vanilla: QMP STOP event of the source → ' +
  'RESUME event of the destination (QEMU timestamps, same host clock). tether: the same two events, which the sidecars ' +
  'log (qemuStopAt on the source\'s "-> switchover", qemuResumeAt on the destination\'s "-> running"); it includes ' +
  'saving checkpoint 0 (device state, durably) while the source is paused before switchover.';
export const TRULY_DIRTIED_NOTE =
  'truly dirtied = per epoch (one checkpoint stop to the next; the first from the destination running), the distinct ' +
  "pages memcheck wrote, from the guest's own progress lines (pass/page position, timestamped as they reach the serial " +
  'log, interpolated linearly), capped at the buffer size; × 4 KiB. Pages the guest kernel dirties are not counted, so the ' +
  'ratio overstates the overhead a little.';
export const PRECOPY_NOTE =
  'vanilla pre-copy runs with guest RAM 8 KiB over the stated size. QEMU 7.2 (7.2.22 included) lacks upstream fix ' +
  '03bfc2188f ("physmem: Fix migration dirty bitmap coherency with TCG memory access", QEMU 9.0): when the RAM block ' +
  "is a multiple of 256 KiB, the dirty-bitmap sync's 64-pages-at-a-time path clears the migration dirty bits without " +
  "resetting TCG's TLB, so guest stores through TLB entries cached before the sync are never marked dirty, the " +
  'destination keeps stale pages, and its guest panics (list corruption) right after a pre-copy completes. With the ' +
  'odd size QEMU takes its per-page path, which resets the TLB for each dirty page: correct, but a sync costs more ' +
  "than in a fixed QEMU, so vanilla pre-copy's figures are a little pessimistic. Vanilla post-copy calls " +
  'migrate-start-postcopy at once; tether under TCG also holds max-bandwidth to a trickle until the switchover, so ' +
  'no RAM page leaves before the stop (its source logs precopyBytes: 0), and pages sent after the stop carry their ' +
  'final content.';
/** See PRECOPY_NOTE: RAM 8 KiB (-m rounds up to 8 KiB) over a multiple of QEMU's 256 KiB fast-sync chunk. */
export const PRECOPY_RAM_PAD_MIB = 8 / 1024;
export const PROGRESS_NOTE =
  'guest progress = memcheck pages written per second in the post-copy window (destination running → migration ' +
  "completed), from the guest's progress lines (4 per pass) interpolated linearly at the window's ends.";

// ------------------------------------------------------------------ the plan

export type Strategy = 'vanilla-precopy' | 'vanilla-postcopy' | 'tether-25' | 'tether-50' | 'tether-100';
export type Workload = 'idle' | 'mc25' | 'mc75' | 'net' | 'disk';
export const STRATEGIES: Strategy[] = ['vanilla-precopy', 'vanilla-postcopy', 'tether-25', 'tether-50', 'tether-100'];

export interface Cell {
  part: Part;
  strategy: Strategy;
  workload: Workload;
  ramMiB: number;
  link: Link;
  repeats: number;
}
export const cellKey = (c: Omit<Cell, 'part' | 'repeats'>): string => `${c.strategy}_${c.workload}_${c.ramMiB}M_${c.link}`;

export function plan(parts: Set<Part>): Cell[] {
  const cells: Cell[] = [];
  const add = (part: Part, strategy: Strategy, workload: Workload, ramMiB: number, link: Link, repeats: number) => {
    const k = cellKey({ strategy, workload, ramMiB, link });
    if (!cells.some((c) => cellKey(c) === k)) cells.push({ part, strategy, workload, ramMiB, link, repeats });
  };
  if (quick) {
    // Every strategy, workload and output path once: not meaningful figures.
    add('grid', 'vanilla-postcopy', 'mc25', 256, '1gbit', 1);
    add('grid', 'tether-25', 'mc25', 256, '1gbit', 1);
    add('grid', 'vanilla-precopy', 'idle', 256, '200mbit', 1);
    add('workload', 'tether-50', 'net', 256, '1gbit', 1);
    add('workload', 'tether-100', 'disk', 256, '1gbit', 1);
    return cells;
  }
  if (opt.parts.has('grid'))
    for (const link of ['1gbit', '200mbit'] as Link[]) for (const s of STRATEGIES) add('grid', s, 'mc25', 512, link, opt.repeats);
  if (parts.has('ram'))
    for (const ram of [1024, 2048])
      for (const s of ['vanilla-postcopy', 'tether-50'] as Strategy[]) add('ram', s, 'mc25', ram, '1gbit', opt.ramRepeats);
  if (parts.has('workload'))
    for (const w of ['idle', 'mc75', 'net', 'disk'] as Workload[])
      for (const s of ['vanilla-postcopy', 'tether-50'] as Strategy[]) {
        if (w === 'disk' && s.startsWith('vanilla')) continue;
        add('workload', s, w, 512, '1gbit', opt.workloadRepeats);
      }
  return cells;
}

export function planText(cells: Cell[], parts: Set<Part>): string[] {
  const L = [
    `guest RAM ${quick ? '256 MiB (quick)' : '512 MiB unless stated'}; memcheck at ${opt.memcheckRate || 'unthrottled'} MB/s; ` +
      `QEMU max-bandwidth ${UNLIMITED_BW / MiB} MiB/s (tbf limits); vanilla pre-copy cancelled if not converged in ${opt.precopyDeadlineS} s`,
  ];
  for (const c of cells) L.push(`${c.part.padEnd(9)} ${cellKey(c).padEnd(40)} × ${c.repeats}`);
  if (opt.parts.has('rollback'))
    L.push(`rollback  bench migrate --only rollback, ${opt.rollbackRepeats} interrupts per standby mode${quick ? ' (hot only)' : ''}`);
  if (parts.has('micro') && !quick) L.push('micro     bench gate, bench journal (their JSON is read back)');
  return L;
}
