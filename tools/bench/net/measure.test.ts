import t from 'tap';
import { medianSample, type Sample } from './measure.ts';

const round = (label: string, p50: number, g2c: number, c2g: number): Sample => ({
  label,
  ping: { sent: 10, received: 10, p50, p99: p50 * 2 } as Sample['ping'],
  tcp: [
    { dir: 'g2c', size: 1, mbitPerS: g2c, cpu: { qemuPct: g2c, sidecarPct: 0 } },
    { dir: 'c2g', size: 1, mbitPerS: c2g },
  ],
  ms: 100,
});

t.test('medianSample: per direction the median round, whole (its CPU figures with it); one round unchanged', async (t) => {
  const one = round('tap', 1, 900, 800);
  t.equal(medianSample([one]), one, 'a single round is the sample itself');
  const m = medianSample([round('tap', 3, 500, 1000), round('tap', 1, 900, 700), round('tap', 2, 700, 800)]);
  t.equal(m.label, 'tap (median of 3 rounds)');
  t.same(
    m.tcp.map((x) => [x.dir, x.mbitPerS]),
    [
      ['g2c', 700],
      ['c2g', 800],
    ],
    'each direction its own median round',
  );
  t.same(m.tcp[0]!.cpu, { qemuPct: 700, sidecarPct: 0 }, 'the CPU of the round whose rate is reported');
  t.equal(m.ping.p50, 2, 'the median ping round');
  t.equal(m.ms, 300);
  const even = medianSample([round('x', 1, 100, 100), round('x', 1, 300, 300)]);
  t.equal(even.tcp[0]!.mbitPerS, 100, 'an even count takes the lower middle (no figure invented)');
});
