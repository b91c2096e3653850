import t from 'tap';
import { summarize } from '../migrate/result.ts';
import { StreamingSummary } from './summary.ts';
import { percentile } from './time.ts';

t.test('a million samples: exact count/sum/max, quantiles within a bucket, no exception', async (t) => {
  const s = new StreamingSummary();
  const exact: number[] = [];
  let seed = 12345;
  const rnd = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  let sum = 0;
  for (let i = 0; i < 1e6; i++) {
    // pause-like: mostly a few ms, a long tail, some zero-cost checkpoints
    const v = i % 1000 === 0 ? 0 : Math.exp(rnd() * 6) * (rnd() < 0.01 ? 50 : 1);
    s.add(v);
    exact.push(v);
    sum += v;
  }
  t.equal(s.count, 1e6);
  t.equal(s.sum, sum);
  t.equal(
    s.max,
    exact.reduce((a, b) => (b > a ? b : a), 0),
  );
  t.equal(s.min, 0);
  for (const p of [1, 50, 90, 99, 99.9]) {
    const want = percentile(exact, p);
    const got = s.quantile(p);
    t.ok(Math.abs(got - want) <= want * (2 ** (1 / 32) - 1) + 1e-12, `p${p}: ${got} vs exact ${want}`);
  }
  t.equal(s.quantile(100), s.max, 'p100 is the max');
  const sum50 = summarize(s);
  t.ok(sum50 && sum50.max === Math.round(s.max * 100) / 100, 'summarize works on a million samples');
});

t.test('edge cases', async (t) => {
  const s = new StreamingSummary();
  t.ok(Number.isNaN(s.quantile(50)), 'empty');
  t.equal(summarize(s), null);
  s.add(7);
  t.equal(s.quantile(50), 7, 'one sample: exactly it (clamped to min/max)');
  s.add(NaN);
  s.add(-1);
  t.equal(s.count, 1, 'NaN and negatives are ignored');
  s.add(1e30);
  t.equal(s.quantile(100), 1e30, 'beyond the bucket range: clamped to the exact max');
});
