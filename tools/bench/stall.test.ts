import t from 'tap';
import { largestGap, median, stallAround } from './stall.ts';

t.test('stall around the switchover: last answer at or before it, first after it', (t) => {
  const times = [0, 20, 40, 60, 1060, 1080, 100]; // unsorted on purpose
  t.same(stallAround(times, 110), { ms: 960, lastBefore: 100, firstAfter: 1060, how: 'switchover' });
  // an answer exactly at the switchover counts as before it
  t.same(stallAround(times, 100), { ms: 960, lastBefore: 100, firstAfter: 1060, how: 'switchover' });
  // the gap around the switchover, not an earlier or a later one
  t.equal(stallAround([0, 500, 520, 540, 2000], 510, 2).ms, 20);
  t.end();
});

t.test('a reply in flight at the STOP does not hide the stall after it', (t) => {
  // the source stops at 45; the answer at 62 was already on its way; then 4 s of silence
  const times = [0, 20, 40, 62, 4062, 4082, 4102];
  t.same(stallAround(times, 45), { ms: 4000, lastBefore: 62, firstAfter: 4062, how: 'switchover' });
  // only the next answersAfter answers count: a later gap (the rollback's) is not this stall
  t.equal(stallAround([...times, 9000], 45, 4).ms, 4000);
  t.equal(stallAround([...times, 9000], 45, 10).ms, 4898);
  t.end();
});

t.test('no answer on one side of the switchover: no figure', (t) => {
  t.same(stallAround([0, 20], 30), { ms: null, lastBefore: 20, firstAfter: null, how: 'switchover' });
  t.same(stallAround([40, 60], 30), { ms: null, lastBefore: null, firstAfter: 40, how: 'switchover' });
  t.equal(stallAround([], 30).ms, null);
  t.end();
});

t.test('without a switchover time: the largest gap inside the interval', (t) => {
  const times = [0, 20, 40, 900, 920, 5000];
  t.same(stallAround(times, null, 50, 0, 1000), { ms: 860, lastBefore: 40, firstAfter: 900, how: 'largest-gap' });
  t.equal(largestGap(times).ms, 4080);
  t.equal(largestGap([7]).ms, null);
  t.end();
});

t.test('median', (t) => {
  t.equal(median([3, 1, 2]), 2);
  t.equal(median([4, 1, 3, 2]), 2.5);
  t.equal(median([null, 5]), 5);
  t.equal(median([null]), null);
  t.end();
});
