import t from 'tap';
import { Counter, Gauge, Registry, Summary } from './registry.ts';

t.test('exposition format: HELP, TYPE, labels sorted and escaped, summary quantiles', async (t) => {
  const r = new Registry();
  const c = r.add(new Counter('x_total', 'Things.'));
  c.inc({ reason: 'lease-expired', role: 'source' });
  c.inc({ role: 'source', reason: 'lease-expired' }, 2);
  c.inc({ reason: 'a"b\\c\nd' });
  const g = r.add(new Gauge('y', 'Current.', (set) => set({ state: 'running' }, 3)));
  const s = r.add(new Summary('z_seconds', 'Pauses.', [0.5, 0.99]));
  for (const v of [0.01, 0.02, 0.03, 0.04]) s.observe(v);
  void g;
  t.equal(
    r.render(),
    [
      '# HELP x_total Things.',
      '# TYPE x_total counter',
      'x_total{reason="lease-expired",role="source"} 3',
      'x_total{reason="a\\"b\\\\c\\nd"} 1',
      '# HELP y Current.',
      '# TYPE y gauge',
      'y{state="running"} 3',
      '# HELP z_seconds Pauses.',
      '# TYPE z_seconds summary',
      'z_seconds{quantile="0.5"} 0.02',
      'z_seconds{quantile="0.99"} 0.04',
      'z_seconds_sum 0.1',
      'z_seconds_count 4',
      '',
    ].join('\n'),
  );
});

t.test('an empty summary reports NaN quantiles and zero count', async (t) => {
  const r = new Registry();
  r.add(new Summary('p', 'P.', [0.5]));
  t.match(r.render(), /p\{quantile="0.5"\} NaN\np_sum 0\np_count 0/);
});

t.test('summary keeps a bounded window but counts everything', async (t) => {
  const s = new Summary('w', 'W.', [0.5], 3);
  for (let i = 1; i <= 10; i++) s.observe(i);
  const lines = s.render();
  t.equal(lines[0], 'w{quantile="0.5"} 9', 'median of the last 3');
  t.equal(lines[2], 'w_count 10');
});
