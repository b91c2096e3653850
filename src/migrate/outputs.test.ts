import t from 'tap';
import { composeOutputs, noOutputs } from './outputs.ts';
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
    ext.map((e) => e.data.toString()),
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

t.test('composeOutputs passes quiesce to the parts that have it', async (t) => {
  const calls: string[] = [];
  const withQuiesce = { ...recorder('journal', calls, 0), quiesce: () => void calls.push('journal.quiesce') };
  composeOutputs([recorder('gate', calls, 0), withQuiesce]).quiesce?.();
  t.same(calls, ['journal.quiesce']);
});
