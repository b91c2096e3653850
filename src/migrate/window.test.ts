import fc from 'fast-check';
import t from 'tap';
import { TetherError } from '../errors.ts';
import { latchOutputs } from '../epoch/outputs.ts';
import type { EpochOutputs } from '../epoch/outputs.ts';
import { MAX_CHECKPOINT_WINDOW } from '../epoch/limits.ts';
import { CheckpointWindow, checkSourceWindow } from './window.ts';

/** Outputs that record which epochs left the host, in order. */
function recordingOutputs() {
  const sealed: number[] = [];
  const released: number[] = [];
  let held: number[] = [];
  const inner: EpochOutputs = {
    seal: async (k) => {
      sealed.push(k);
      held.push(k);
      return [];
    },
    release: (k) => {
      while (held.length > 0 && held[0]! <= k) released.push(held.shift()!);
    },
    passThrough: () => {
      released.push(...held);
      held = [];
    },
    discard: () => {
      held = [];
    },
  };
  return { outputs: latchOutputs(inner), sealed, released, held: () => held };
}

t.test('size is bounded and validated', async (t) => {
  for (const bad of [0, -1, 1.5, MAX_CHECKPOINT_WINDOW + 1, NaN]) {
    t.throws(() => new CheckpointWindow(bad), { code: 'ERR_WINDOW' }, `size ${bad}`);
  }
  t.equal(new CheckpointWindow(1).size, 1);
  t.equal(new CheckpointWindow(MAX_CHECKPOINT_WINDOW).size, MAX_CHECKPOINT_WINDOW);
});

t.test('epochs are taken strictly in order', async (t) => {
  const w = new CheckpointWindow(4);
  t.throws(() => w.take(2), { code: 'ERR_WINDOW' }, 'cannot skip epoch 1');
  void w.take(1);
  t.throws(() => w.take(1), { code: 'ERR_WINDOW' }, 'cannot take an epoch twice');
  t.throws(() => w.take(3), { code: 'ERR_WINDOW' }, 'cannot skip epoch 2');
  void w.take(2);
  t.same(w.inflight, [1, 2]);
  t.equal(w.lastTaken, 2);
});

t.test('never more than size in flight; an ACK makes room', async (t) => {
  const w = new CheckpointWindow(2);
  void w.take(1);
  t.ok(w.hasRoom);
  void w.take(2);
  t.notOk(w.hasRoom);
  t.throws(() => w.take(3), { code: 'ERR_WINDOW' }, 'the third one does not fit');
  let room = false;
  const p = w.room().then(() => (room = true));
  await Promise.resolve();
  t.notOk(room, 'room() waits while full');
  t.equal(w.ack(1), 1);
  await p;
  t.ok(room, 'ACK(1) made room');
  void w.take(3);
  t.same(w.inflight, [2, 3]);
});

t.test('ACK(k) acknowledges every epoch <= k and releases them in order', async (t) => {
  const o = recordingOutputs();
  const w = new CheckpointWindow(3);
  const acks: number[] = [];
  for (const k of [1, 2, 3]) {
    await o.outputs.seal(k);
    void w.take(k).then(() => acks.push(k));
  }
  const k = w.ack(2);
  t.equal(k, 2);
  o.outputs.release(k!);
  await new Promise((r) => setImmediate(r));
  t.same(acks, [1, 2], 'the waiters of 1 and 2 resolved, in order');
  t.same(o.released, [1, 2], 'outputs of epochs 1 and 2 left, in order');
  t.same(o.held(), [3], 'epoch 3 is still held');
  t.same(w.inflight, [3]);
  t.equal(w.lastAcked, 2);
});

t.test('an ACK of an epoch not in flight changes nothing', async (t) => {
  const w = new CheckpointWindow(3);
  t.equal(w.ack(1), null, 'nothing taken yet');
  void w.take(1);
  void w.take(2);
  t.equal(w.ack(3), null, 'from the future');
  t.equal(w.ack(0), null, 'before the window');
  t.same(w.inflight, [1, 2]);
  t.equal(w.ack(1), 1);
  t.equal(w.ack(1), null, 'duplicate');
  t.same(w.inflight, [2]);
});

t.test('drained() waits for every checkpoint taken (the final one included)', async (t) => {
  const w = new CheckpointWindow(3);
  await w.drained();
  void w.take(1);
  void w.take(2);
  let drained = false;
  const p = w.drained().then(() => (drained = true));
  w.ack(1);
  await new Promise((r) => setImmediate(r));
  t.notOk(drained, 'still 2 in flight');
  w.ack(2);
  await p;
  t.ok(drained);
});

t.test('rollback with k+1 in flight: nothing more is acknowledged or released', async (t) => {
  const o = recordingOutputs();
  const w = new CheckpointWindow(2);
  const results: string[] = [];
  const take = async (k: number) => {
    await o.outputs.seal(k);
    w.take(k).then(
      () => results.push(`ack ${k}`),
      (e: TetherError) => results.push(`fail ${k} ${e.code}`),
    );
  };
  await take(1);
  await take(2);
  o.outputs.release(w.ack(1)!);
  await take(3);
  const room = w.room(); // full again: 2 and 3 in flight
  // The source rolled back to checkpoint 1 (or 2, had it applied it): D fences.
  w.fail(new TetherError('ERR_FENCED', 'rolled back'));
  o.outputs.discard();
  t.equal(w.ack(2), null, 'a late ACK after fencing is ignored');
  t.throws(() => o.outputs.release(2), { code: 'ERR_OUTPUTS_DISCARDED' });
  await t.rejects(room, { code: 'ERR_FENCED' });
  await t.rejects(w.drained(), { code: 'ERR_FENCED' });
  t.throws(() => w.take(4), { code: 'ERR_WINDOW' });
  await new Promise((r) => setImmediate(r));
  t.same(results, ['ack 1', 'fail 2 ERR_FENCED', 'fail 3 ERR_FENCED']);
  t.same(o.released, [1], 'only the acknowledged epoch ever left');
  t.notOk(w.hasRoom);
});

t.test('fence clock: the oldest checkpoint sent whole and not acknowledged', async (t) => {
  const w = new CheckpointWindow(3);
  t.equal(w.oldestUnackedSentAt(), undefined);
  void w.take(1);
  t.equal(w.oldestUnackedSentAt(), undefined, 'still sending');
  w.sent(1, 100);
  void w.take(2);
  w.sent(2, 150);
  t.same(w.oldestUnackedSentAt(), { epoch: 1, sentAt: 100 });
  w.ack(1);
  t.same(w.oldestUnackedSentAt(), { epoch: 2, sentAt: 150 });
  w.ack(2);
  t.equal(w.oldestUnackedSentAt(), undefined);
});

t.test('property: any interleaving of takes and in-order ACKs keeps the invariants', async () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 5 }),
      fc.array(fc.oneof(fc.constant('take'), fc.integer({ min: 0, max: 4 })), { maxLength: 60 }),
      (size, ops) => {
        const o = recordingOutputs();
        const w = new CheckpointWindow(size);
        let sealed = 0;
        for (const op of ops) {
          if (op === 'take') {
            if (!w.hasRoom) continue;
            sealed++;
            void o.outputs.seal(sealed);
            void w.take(sealed);
          } else {
            // an ACK `op` epochs into the window (or beyond it)
            const k = w.lastAcked + op;
            const r = w.ack(k);
            if (r !== null) o.outputs.release(r);
            if (k > w.lastTaken || k <= 0 || op === 0) {
              if (r !== null) throw new Error(`ack ${k} accepted outside the window`);
            }
          }
          if (w.inflight.length > size) throw new Error('window overflow');
          // released: exactly 1..lastAcked, in order; held: the rest
          const want = Array.from({ length: w.lastAcked }, (_, i) => i + 1);
          if (JSON.stringify(o.released) !== JSON.stringify(want)) throw new Error(`released ${o.released} want ${want}`);
          const inflight = Array.from({ length: w.lastTaken - w.lastAcked }, (_, i) => w.lastAcked + i + 1);
          if (JSON.stringify(w.inflight) !== JSON.stringify(inflight)) throw new Error(`inflight ${w.inflight}`);
        }
      },
    ),
  );
});

t.test('the source refuses a checkpoint beyond applied + window', async (t) => {
  checkSourceWindow(1, 0, 1);
  checkSourceWindow(4, 1, 3);
  t.throws(() => checkSourceWindow(2, 0, 1), { code: 'ERR_CKPT_WINDOW' });
  t.throws(() => checkSourceWindow(5, 1, 3), { code: 'ERR_CKPT_WINDOW' });
  // a destination that keeps to its window never trips it: it takes k+W only after ACK(k),
  // which the source sends after applying k
  const w = new CheckpointWindow(3);
  let applied = 0;
  for (let k = 1; k <= 20; k++) {
    if (!w.hasRoom) {
      applied = w.inflight[0]!;
      w.ack(applied);
    }
    checkSourceWindow(k, applied, 3);
    void w.take(k);
  }
  t.pass();
});
