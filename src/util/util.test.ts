import t from 'tap';
import { parseHostPort } from '../daemon/daemon.ts';
import { asPeerControl } from '../peer/control.ts';
import { StateMachine } from './state.ts';
import { Nap, percentile } from './time.ts';

t.test('state machine: checked transitions, listeners see old and new', async (t) => {
  const seen: string[] = [];
  const sm = new StateMachine<'a' | 'b' | 'c'>('thing', 'a', { a: ['b'], b: ['c', 'a'], c: [] });
  sm.onChange((from, to) => seen.push(`${from}>${to}`));
  sm.to('b');
  t.throws(() => sm.to('b'), { code: 'ERR_STATE_TRANSITION' });
  sm.to('c');
  t.throws(() => sm.to('a'), { code: 'ERR_STATE_TRANSITION' });
  t.equal(sm.state, 'c');
  t.same(seen, ['a>b', 'b>c']);
});

t.test('percentile: nearest rank', async (t) => {
  t.ok(Number.isNaN(percentile([], 50)), 'empty sample');
  t.equal(percentile([5], 99), 5);
  t.equal(percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 50), 5);
  t.equal(percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99), 10);
  t.equal(percentile([10, 1, 5], 0), 1);
});

t.test('host:port parsing', async (t) => {
  t.same(parseHostPort('10.0.0.2:7700'), { host: '10.0.0.2', port: 7700 });
  t.same(parseHostPort('[::1]:7700'), { host: '::1', port: 7700 });
  for (const bad of ['10.0.0.2', ':7700', 'h:0', 'h:65536', 'h:x']) t.throws(() => parseHostPort(bad), { code: 'ERR_USAGE' }, bad);
});

t.test('peer control messages are validated', async (t) => {
  const migrationId = '0b7c2f3e-5d1a-4c8e-9f00-1234567890ab';
  t.same(asPeerControl({ kind: 'complete', migrationId, finalEpoch: 3 }), { kind: 'complete', migrationId, finalEpoch: 3 });
  t.throws(() => asPeerControl({ kind: 'complete', migrationId }), { code: 'ERR_PEER_CONTROL' });
  t.throws(() => asPeerControl({ kind: 'done', finalEpoch: 3 }), { code: 'ERR_PEER_CONTROL' }, 'no one-way completion any more');
  const answer = { kind: 'resolve', migrationId, vm: 'vm1', outcome: 'completed', epoch: 7 };
  t.same(asPeerControl(answer), answer);
  t.throws(() => asPeerControl({ ...answer, outcome: 'maybe' }), { code: 'ERR_PEER_CONTROL' });
  t.throws(() => asPeerControl({ ...answer, vm: 1 }), { code: 'ERR_PEER_CONTROL' });
  t.throws(() => asPeerControl({ ...answer, epoch: 'x' }), { code: 'ERR_PEER_CONTROL' });
  t.same(asPeerControl({ kind: 'resolved', migrationId, known: false }), { kind: 'resolved', migrationId, known: false });
  t.throws(() => asPeerControl({ kind: 'resolved', migrationId }), { code: 'ERR_PEER_CONTROL' });
  t.throws(() => asPeerControl({ kind: 'prepare', migrationId, vm: {} }), { code: 'ERR_PEER_CONTROL' }, 'vm required');
  t.throws(() => asPeerControl({ kind: 'nope' }), { code: 'ERR_PEER_CONTROL' });
  t.throws(() => asPeerControl({ kind: 'epoch-stats', epoch: 1, pauseMs: 'x' }), { code: 'ERR_PEER_CONTROL' });
});

t.test('Nap: a nap ends at its time or at wake(); a wake between naps is kept for the next', async (t) => {
  const nap = new Nap();
  let ended = false;
  const long = nap.nap(60_000).then(() => (ended = true));
  await Promise.resolve();
  t.notOk(ended, 'napping');
  nap.wake();
  await long;
  t.ok(ended, 'woken long before its time');
  await nap.nap(1); // ends by its timer
  nap.wake(); // nobody naps: the next nap returns at once
  const t0 = Date.now();
  await nap.nap(60_000);
  t.ok(Date.now() - t0 < 60_000, 'the pending wake ended the next nap');
  const order: string[] = [];
  await Promise.all([nap.nap(5).then(() => order.push('timer')), Promise.resolve().then(() => order.push('tick'))]);
  t.same(order, ['tick', 'timer'], 'the pending wake was used once');
});
