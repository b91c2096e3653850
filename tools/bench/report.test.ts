import t from 'tap';
import { barsSpec, markdownTable, renderSvg, timelineSpec, verdict } from './report.ts';

t.test('verdicts: PASS/MISS against the target, n/m when not measured, blank without a target', async (t) => {
  t.equal(verdict({ name: 'a', value: 59, unit: 'ms', target: { op: '<=', value: 60 } }), 'PASS');
  t.equal(verdict({ name: 'a', value: 61, unit: 'ms', target: { op: '<=', value: 60 } }), 'MISS');
  t.equal(verdict({ name: 'a', value: 0.79, unit: '×', target: { op: '>=', value: 0.8 } }), 'MISS');
  t.equal(verdict({ name: 'a', value: null, unit: 'ms', target: { op: '<=', value: 60 } }), 'n/m');
  t.equal(verdict({ name: 'a', value: 1, unit: 'ms' }), '');
});

t.test('markdown table: one row per figure, cells escaped', async (t) => {
  const md = markdownTable([
    { name: 'restore p50 | hot', value: 41.234, unit: 'ms', target: { op: '<=', value: 60 }, note: 'n=6\nabort' },
    { name: 'total', value: 1234, unit: 'ms' },
  ]);
  const lines = md.split('\n');
  t.equal(lines.length, 4);
  t.match(lines[2], /^\| restore p50 \\\| hot \| 41\.2 ms \| ≤ 60\.0 ms \| PASS \| n=6 abort \|$/);
  t.match(lines[3], /^\| total \| 1234 ms \|  \|  \|  \|$/);
});

t.test('plots render to SVG headless', async (t) => {
  const tl = await renderSvg(
    timelineSpec({
      title: 'tether migration',
      ram: [
        { t: 0, mib: 0 },
        { t: 1, mib: 100 },
      ],
      checkpoints: [{ t: 0.5, epoch: 1, pauseMs: 12, kib: 40 }],
      events: [{ t: 0.4, label: 'switchover' }],
    }),
  );
  t.match(tl, /^<svg /);
  t.match(tl, /switchover/);
  t.match(tl, /RAM sent \(MiB\)/);
  t.notMatch(tl, /held frames/, 'no gate panel without samples');
  const withHeld = await renderSvg(
    timelineSpec({
      title: 'with a NIC',
      ram: [{ t: 0, mib: 0 }],
      checkpoints: [],
      events: [],
      held: [
        { t: 0, frames: 0 },
        { t: 0.5, frames: 12 },
      ],
    }),
  );
  t.match(withHeld, /held frames \(D gate\)/);
  const bars = await renderSvg(
    barsSpec({
      title: 'restore',
      yTitle: 'ms',
      rows: [
        { group: 'p50', series: 'hot', value: 40 },
        { group: 'p50', series: 'cold', value: 200 },
      ],
      target: { value: 60, label: 'goal 60 ms' },
    }),
  );
  t.match(bars, /^<svg /);
  t.match(bars, /goal 60 ms/);
  t.match(bars, /cold/);
});
