import fc from 'fast-check';
import t from 'tap';
import { composeOutputs } from '../epoch/outputs.ts';
import { frameHash } from './gate.ts';
import { rig } from './gate.test-util.ts';

t.test('pass-through: frames leave at once', async (t) => {
  const r = rig('pass');
  r.send('a', 'b');
  t.same(r.wire, ['a', 'b']);
  await r.gate.seal(1); // harmless on a pass-through gate (composed with others)
  t.equal(r.gate.heldFrames, 0);
});

t.test('gated: nothing leaves before release; release(k) sends epochs <= k in order', async (t) => {
  const r = rig('gated');
  r.send('1a', '1b');
  await r.gate.seal(1);
  r.send('2a');
  await r.gate.seal(2);
  r.send('3a');
  t.same(r.wire, [], 'nothing before ACK');
  t.equal(r.gate.heldFrames, 4);
  r.gate.release(1);
  t.same(r.wire, ['1a', '1b']);
  r.gate.release(2);
  t.same(r.wire, ['1a', '1b', '2a'], 'epoch 3 still held: not sealed');
  t.throws(() => r.gate.release(3), { code: 'ERR_GATE_EPOCH' }, 'an unsealed epoch cannot be released');
  t.equal(r.gate.heldFrames, 1);
  const rel = r.log.filter((x) => x.t === 'release');
  t.same(
    rel.map((x) => [x.epoch, x.frames]),
    [
      [1, 2],
      [2, 1],
    ],
  );
  t.same((rel[0] as { hashes: string[] }).hashes, [frameHash(Buffer.from('1a')), frameHash(Buffer.from('1b'))]);
});

t.test('release(k) covering several epochs (a lost ACK followed by a later one)', async (t) => {
  const r = rig('gated');
  r.send('1');
  await r.gate.seal(1);
  r.send('2');
  await r.gate.seal(2);
  r.gate.release(2);
  t.same(r.wire, ['1', '2']);
  r.gate.release(1); // stale ACK: nothing left of epoch 1
  t.same(r.wire, ['1', '2']);
});

t.test('seal out of order is refused and changes nothing', async (t) => {
  const r = rig('gated');
  r.send('1');
  await t.rejects(r.gate.seal(2), { code: 'ERR_GATE_EPOCH' });
  t.equal(r.gate.currentEpoch, 1);
  await r.gate.seal(1);
  r.gate.release(1);
  t.same(r.wire, ['1']);
});

t.test('passThrough releases everything held, in order, then passes', async (t) => {
  const r = rig('gated');
  r.send('1');
  await r.gate.seal(1);
  r.send('2');
  r.gate.release(1);
  r.gate.passThrough();
  r.send('3');
  t.same(r.wire, ['1', '2', '3']);
  t.equal(r.gate.mode.state, 'pass');
});

t.test('discard: held frames never leave, TAP goes down, release after discard sends nothing', async (t) => {
  const r = rig('gated');
  r.send('1');
  await r.gate.seal(1);
  r.send('2');
  r.gate.discard();
  t.equal(r.down(), 1);
  r.gate.release(1);
  r.gate.passThrough();
  r.send('3');
  t.same(r.wire, []);
  t.equal(r.gate.heldFrames, 0);
  t.same(
    r.log.filter((x) => x.t === 'discard').map((x) => x.epoch),
    [1, 2],
  );
  r.gate.discard();
  t.equal(r.down(), 1, 'idempotent');
});

t.test('bound: full queue pauses the guest, never drops; resumes at half after release', async (t) => {
  const r = rig('gated', 100, 1000);
  r.send('x'.repeat(60));
  t.same(r.pauses, []);
  r.send('y'.repeat(60), 'z'.repeat(60)); // already read: held past the bound
  t.same(r.pauses, [true]);
  t.equal(r.gate.heldFrames, 3);
  t.equal(r.gate.heldBytes, 180);
  r.send('w'); // a chunk already in flight when the pause took effect
  t.same(r.pauses, [true], 'one back-pressure event');
  await r.gate.seal(1);
  r.gate.release(1);
  t.same(r.pauses, [true, false]);
  t.equal(r.wire.length, 4, 'nothing dropped');
  const f = rig('gated', 1 << 20, 2);
  f.send('a', 'b');
  t.same(f.pauses, [true], 'frame bound');
});

t.test('gate joins a composed barrier', async (t) => {
  const a = rig('gated');
  const b = rig('gated');
  const o = composeOutputs([a.gate, b.gate]);
  a.send('a1');
  b.send('b1');
  t.same(await o.seal(1), []);
  o.release(1);
  t.same([a.wire, b.wire], [['a1'], ['b1']]);
  o.discard();
  t.equal(a.down() + b.down(), 2);
});

t.test('property: no frame leaves before its epoch is released; all leave in order', async (t) => {
  type Op = { k: 'send'; n: number } | { k: 'seal' } | { k: 'ack' } | { k: 'pass' };
  const op = fc.oneof(
    fc.record({ k: fc.constant('send' as const), n: fc.integer({ min: 1, max: 3 }) }),
    fc.record({ k: fc.constant('seal' as const) }),
    fc.record({ k: fc.constant('ack' as const) }),
    fc.record({ k: fc.constant('pass' as const) }),
  );
  await fc.assert(
    fc.asyncProperty(fc.array(op, { maxLength: 60 }), async (ops: Op[]) => {
      const r = rig('gated', 50, 6);
      let id = 0;
      const epochOf = new Map<string, number>();
      let released = 0;
      let sealed = 0;
      let pass = false;
      for (const o of ops) {
        if (o.k === 'send') {
          const fs = Array.from({ length: o.n }, () => String(id++));
          for (const f of fs) epochOf.set(f, pass ? 0 : r.gate.currentEpoch);
          r.send(...fs);
        } else if (o.k === 'seal' && !pass) await r.gate.seal(++sealed);
        else if (o.k === 'ack' && released < sealed) r.gate.release(++released);
        else if (o.k === 'pass') {
          r.gate.passThrough();
          pass = true;
        }
        // invariant: every frame on the wire is in order and of a released epoch
        for (let i = 0; i < r.wire.length; i++) {
          if (r.wire[i] !== String(i)) return false;
          const e = epochOf.get(r.wire[i]!)!;
          if (!pass && e > released) return false;
        }
      }
      return r.wire.length + r.gate.heldFrames === id;
    }),
  );
});

t.test('quiesce: a full gate reads on until seal, so the barrier can stop QEMU; full again after seal', async (t) => {
  const r = rig('gated', 10, 1000);
  r.send('aaaaaaaaaa'); // 10 bytes: bound reached
  t.same(r.pauses, [true], 'full: reading stops');
  r.gate.quiesce();
  t.same(r.pauses, [true, false], 'quiesce resumes reading');
  r.send('bbbbb', 'ccccc');
  t.same(r.pauses, [true, false], 'no new pause before the seal');
  t.equal(r.gate.heldBytes, 20, 'held past the bound, nothing dropped');
  await r.gate.seal(1);
  t.same(r.pauses, [true, false, true], 'seal: still full, reading stops again');
  t.same(r.wire, [], 'nothing left the gate');
  r.gate.release(1);
  t.same(r.wire, ['aaaaaaaaaa', 'bbbbb', 'ccccc'], 'every frame released in order');
  t.same(r.pauses, [true, false, true, false]);
});

t.test('unquiesce: the barrier did not come (the final loop iteration), a full gate stops reading again', async (t) => {
  const r = rig('gated', 10, 1000);
  r.send('aaaaaaaaaa');
  r.gate.quiesce();
  t.same(r.pauses, [true, false]);
  r.gate.unquiesce();
  t.same(r.pauses, [true, false, true], 'the bound holds again without a seal');
  r.gate.unquiesce();
  t.same(r.pauses, [true, false, true], 'a second unquiesce changes nothing');
});

t.test('quiesce on a gate that is not full changes nothing; discard of a full gate reads on and drops', async (t) => {
  const r = rig('gated', 10, 1000);
  r.gate.quiesce();
  t.same(r.pauses, []);
  await r.gate.seal(1);
  r.send('aaaaaaaaaaaa');
  t.same(r.pauses, [true]);
  r.gate.discard();
  t.same(r.pauses, [true, false], 'a fenced gate does not leave QEMU blocked in its write');
  r.send('x');
  t.same(r.wire, [], 'nothing leaves a fenced gate');
});

t.test('release log: monotonic clock on every line, the mode change names where it came from', async (t) => {
  const r = rig('gated');
  r.send('a');
  await r.gate.seal(1);
  r.gate.release(1);
  r.gate.passThrough();
  t.ok(
    r.log.every((x) => typeof x.mono === 'number' && x.mono > 0),
    'mono everywhere',
  );
  const monos = r.log.map((x) => x.mono);
  t.same(
    monos,
    [...monos].sort((a, b) => a - b),
    'non-decreasing',
  );
  t.same(
    r.log.filter((x) => x.t === 'mode').map((x) => [x.mode, x.from]),
    [
      ['gated', undefined],
      ['pass', 'gated'],
    ],
  );
});

t.test('reserve: reading pauses the reserve below the bound, resumes at half of that threshold', async (t) => {
  // bound 100 bytes / 50 frames, reserve 40 / 10: pause at 60 bytes or 40 frames
  const r = rig('gated', 100, 50, { bytes: 40, frames: 10 });
  r.send('x'.repeat(59));
  t.same(r.pauses, [], 'below the threshold');
  r.send('y');
  t.same(r.pauses, [true], 'threshold 60 = bound 100 - reserve 40 reached');
  r.send('z'.repeat(40)); // in flight when the pause took effect: inside the reserve
  t.equal(r.gate.heldBytes, 100);
  t.same(r.over, { bytes: 0, frames: 0, calls: 0 }, 'at the bound, not over it');
  await r.gate.seal(1);
  r.gate.release(1);
  t.same(r.pauses, [true, false], 'empty: reading resumes');

  const f = rig('gated', 1 << 20, 50, { bytes: 0, frames: 10 });
  f.send(...Array.from({ length: 39 }, () => 'a'));
  t.same(f.pauses, []);
  f.send('b');
  t.same(f.pauses, [true], 'frame threshold 40 = 50 - 10');
  await f.gate.seal(1);
  f.send('c'); // epoch 2: 41 held
  f.gate.release(1);
  t.equal(f.gate.heldFrames, 1);
  t.same(f.pauses, [true, false], 'resumes at <= 20 frames (half the threshold)');

  const h = rig('gated', 100, 1000, { bytes: 40, frames: 0 });
  h.send('x'.repeat(60));
  await h.gate.seal(1);
  h.send('y'.repeat(10)); // epoch 2
  h.gate.release(1); // 10 held: > 0 but <= 30
  t.same(h.pauses, [true, false], 'hysteresis at half of 60, not half of the bound');
});

t.test('over the bound: frames are held anyway, counted and logged once per episode', async (t) => {
  const r = rig('gated', 100, 4, { bytes: 40, frames: 1 });
  r.send('a'.repeat(70));
  t.same(r.pauses, [true]);
  r.gate.quiesce(); // the barrier reads on
  r.send('b'.repeat(40)); // 110 held: 10 over
  t.same(r.over, { bytes: 10, frames: 0, calls: 1 });
  r.send('c'.repeat(5), 'd', 'e'); // 117 bytes, 5 frames: 7 more bytes, 1 frame over
  t.same(r.over, { bytes: 17, frames: 1, calls: 2 });
  t.equal(r.gate.heldBytes, 117, 'nothing dropped');
  const loud = r.errors.filter((e) => e.level === 'error');
  t.equal(loud.length, 1, 'one error line for the episode');
  t.match(loud[0], { maxBytes: 100, maxFrames: 4, bytes: 110, quiescing: true });
  await r.gate.seal(1);
  r.gate.release(1);
  t.same(r.wire.length, 5, 'every held frame left on the ACK');
  r.send('f'.repeat(101)); // a new episode after the queue came back under the bound
  t.equal(r.errors.filter((e) => e.level === 'error').length, 2);
  t.same(r.over, { bytes: 18, frames: 1, calls: 3 });
});

t.test('a bound inside its reserve is refused', async (t) => {
  t.throws(() => rig('gated', 100, 50, { bytes: 100, frames: 10 }), { code: 'ERR_CONFIG_INVALID' });
  t.throws(() => rig('gated', 100, 50, { bytes: 10, frames: 60 }), { code: 'ERR_CONFIG_INVALID' });
});
