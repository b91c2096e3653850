import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { nullLogger } from '../util/log.ts';
import { ackHoldMs, CUT_COMPLETION, cutBeforeRecord, HOLD_ACKS_TRIGGER, parseFaults, restoreLoadPath } from './faults.ts';

t.same(parseFaults(undefined), {});
t.same(parseFaults('corrupt-epoch=5, delay-first-checkpoint-ms=100'), { corruptEpoch: 5, delayFirstCheckpointMs: 100 });
t.throws(() => parseFaults('corupt-epoch=5'), { code: 'ERR_FAULTS_INVALID' });
t.throws(() => parseFaults('corrupt-epoch=-1'), { code: 'ERR_FAULTS_INVALID' });
t.throws(() => parseFaults('truncate-epoch'), { code: 'ERR_FAULTS_INVALID' });
t.same(parseFaults('cut-completion=3'), { cutCompletion: 3 });
t.same(parseFaults('gate-open,corrupt-epoch=2'), { gateOpen: true, corruptEpoch: 2 });
t.same(parseFaults('relay-pause-ms=3000,relay-pause-epoch=4'), { relayPauseMs: 3000, relayPauseEpoch: 4 });
t.same(parseFaults('relay-pause-ms=3000,relay-pause-bytes=212992'), { relayPauseMs: 3000, relayPauseBytes: 212992 });
t.same(parseFaults('relay-pause-ms=1,relay-sndbuf-default'), { relayPauseMs: 1, relaySndbufDefault: true });
t.throws(() => parseFaults('gate-open=1'), { code: 'ERR_FAULTS_INVALID' });
t.same(parseFaults('hold-acks-ms=3000,hold-acks-epoch=4'), { holdAcksMs: 3000, holdAcksEpoch: 4 });
t.same(parseFaults('journal-write-through,corrupt-epoch=2'), { journalWriteThrough: true, corruptEpoch: 2 });
t.throws(() => parseFaults('journal-write-through=1'), { code: 'ERR_FAULTS_INVALID' });
t.same(parseFaults('gate-open,journal-write-through'), { gateOpen: true, journalWriteThrough: true });
t.same(parseFaults('hold-completion,cut-completion=5'), { holdCompletion: true, cutCompletion: 5 });
t.same(parseFaults('hold-writeback'), { holdWriteback: true });
t.same(parseFaults('hold-writeback-early'), { holdWritebackEarly: true });
t.throws(() => parseFaults('hold-writeback=1'), { code: 'ERR_FAULTS_INVALID' });
t.throws(() => parseFaults('hold-completion=1'), { code: 'ERR_FAULTS_INVALID' });
t.same(parseFaults('slow-scan-ms=5000,slow-scan-epoch=2'), { slowScanMs: 5000, slowScanEpoch: 2 });
t.same(parseFaults('fail-restore-load'), { failRestoreLoad: true });
t.same(parseFaults('plain-stream,hold-migrate-trigger'), { plainStream: true, holdMigrateTrigger: true });

t.test('hold-acks: armed once by the first checkpoint it applies to, then held to its end', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'faults-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  t.equal(ackHoldMs({}, 9, dir, {}), 0, 'no fault: never held');
  const f = { holdAcksMs: 60_000, holdAcksEpoch: 3, holdAcksTrigger: true };
  const hold: { until?: number } = {};
  t.equal(ackHoldMs(f, 2, dir, hold), 0, 'before hold-acks-epoch: not held');
  t.equal(ackHoldMs(f, 3, dir, hold), 0, 'trigger file absent: not held');
  t.equal(hold.until, undefined, 'and not armed');
  fs.writeFileSync(path.join(dir, HOLD_ACKS_TRIGGER), '');
  t.ok(ackHoldMs(f, 4, dir, hold) > 0, 'trigger present: held');
  const until = hold.until;
  t.ok(until !== undefined, 'armed');
  fs.rmSync(path.join(dir, HOLD_ACKS_TRIGGER));
  t.ok(ackHoldMs(f, 5, dir, hold) > 0, 'armed: later checkpoints wait behind it, trigger or not');
  t.equal(hold.until, until, 'one hold: its end does not move');
  hold.until = 0;
  t.ok(ackHoldMs(f, 6, dir, hold) <= 0, 'past its end: no longer held');
});

t.test('cut-completion before the record is the source step 2 only', async (t) => {
  for (let n = 1; n <= 6; n++)
    t.equal(cutBeforeRecord({ cutCompletion: n }, nullLogger, 7), n === CUT_COMPLETION.beforeRecord, `step ${n}`);
  t.equal(cutBeforeRecord({}, nullLogger, 7), false, 'no fault');
});

t.test('fail-restore-load hands over a file that is no migration stream', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'faults-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const dev = path.join(dir, 'ckpt.devstate');
  t.equal(await restoreLoadPath({}, dev), dev, 'no fault: the real file');
  const p = await restoreLoadPath({ failRestoreLoad: true }, dev);
  t.not(p, dev);
  t.match(fs.readFileSync(p, 'utf8'), /not a migration stream/);
});
