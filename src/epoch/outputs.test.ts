import t from 'tap';
import { composeOutputs, latchOutputs, noOutputs } from './outputs.ts';
import type { EpochOutputs } from './outputs.ts';

function recorder(name: string, calls: string[], extents: number): EpochOutputs {
  return {
    seal: async (k) => {
      calls.push(`${name}.seal(${k})`);
      return Array.from({ length: extents }, (_, i) => ({ offset: i * 512, data: Buffer.from(name) }));
    },
    release: (k) => void calls.push(`${name}.release(${k})`),
    passThrough: () => void calls.push(`${name}.passThrough`),
    discard: () => void calls.push(`${name}.discard`),
  };
}

t.test('composeOutputs reaches every part in order and concatenates extents', async (t) => {
  const calls: string[] = [];
  const o = composeOutputs([recorder('gate', calls, 0), recorder('journal', calls, 2)]);
  const ext = await o.seal(3);
  t.same(
    ext.map((e) => e.data!.toString()),
    ['journal', 'journal'],
  );
  o.release(3);
  o.passThrough();
  o.discard();
  t.same(calls, [
    'gate.seal(3)',
    'journal.seal(3)',
    'gate.release(3)',
    'journal.release(3)',
    'gate.passThrough',
    'journal.passThrough',
    'gate.discard',
    'journal.discard',
  ]);
});

t.test('composeOutputs of nothing is noOutputs', async (t) => {
  t.equal(composeOutputs([]), noOutputs);
  t.same(await noOutputs.seal(1), []);
});

t.test('latchOutputs: nothing leaves after discard; nothing is dropped after pass-through', async (t) => {
  const calls: string[] = [];
  const o = latchOutputs(recorder('gate', calls, 0));
  await o.seal(1);
  o.release(1);
  o.discard();
  t.equal(o.state, 'discarded');
  // a late ACK of an epoch the fenced destination had already sealed
  t.throws(() => o.release(2), { code: 'ERR_OUTPUTS_DISCARDED' });
  t.throws(() => o.passThrough(), { code: 'ERR_OUTPUTS_DISCARDED' });
  await t.rejects(o.seal(2), { code: 'ERR_OUTPUTS_DISCARDED' });
  o.discard(); // idempotent
  t.same(calls, ['gate.seal(1)', 'gate.release(1)', 'gate.discard'], 'the device never saw a release after discard');

  const calls2: string[] = [];
  const p = latchOutputs(recorder('gate', calls2, 0));
  p.passThrough();
  t.throws(() => p.discard(), { code: 'ERR_OUTPUTS_DISCARDED' });
  t.throws(() => p.release(1), { code: 'ERR_OUTPUTS_DISCARDED' });
  t.same(calls2, ['gate.passThrough']);
});

t.test('composeOutputs passes quiesce to the parts that have it', async (t) => {
  const calls: string[] = [];
  const withQuiesce = { ...recorder('journal', calls, 0), quiesce: () => void calls.push('journal.quiesce') };
  composeOutputs([recorder('gate', calls, 0), withQuiesce]).quiesce?.();
  t.same(calls, ['journal.quiesce']);
});

t.test('composeOutputs and latchOutputs pass unquiesce to the parts that have it, until discarded', async (t) => {
  const calls: string[] = [];
  const withUnquiesce = { ...recorder('journal', calls, 0), unquiesce: () => void calls.push('journal.unquiesce') };
  const o = latchOutputs(composeOutputs([recorder('gate', calls, 0), withUnquiesce]));
  o.unquiesce?.();
  o.discard();
  o.unquiesce?.();
  t.same(calls, ['journal.unquiesce', 'gate.discard', 'journal.discard']);
});
