import t from 'tap';
import { parseFaults } from './faults.ts';

t.same(parseFaults(undefined), {});
t.same(parseFaults('corrupt-epoch=5, delay-first-checkpoint-ms=100'), { corruptEpoch: 5, delayFirstCheckpointMs: 100 });
t.throws(() => parseFaults('corupt-epoch=5'), { code: 'ERR_FAULTS_INVALID' });
t.throws(() => parseFaults('corrupt-epoch=-1'), { code: 'ERR_FAULTS_INVALID' });
t.throws(() => parseFaults('truncate-epoch'), { code: 'ERR_FAULTS_INVALID' });
t.same(parseFaults('cut-completion=3'), { cutCompletion: 3 });
t.same(parseFaults('gate-open,corrupt-epoch=2'), { gateOpen: true, corruptEpoch: 2 });
t.throws(() => parseFaults('gate-open=1'), { code: 'ERR_FAULTS_INVALID' });
t.same(parseFaults('hold-acks-ms=3000,hold-acks-epoch=4'), { holdAcksMs: 3000, holdAcksEpoch: 4 });
t.same(parseFaults('journal-write-through,corrupt-epoch=2'), { journalWriteThrough: true, corruptEpoch: 2 });
t.throws(() => parseFaults('journal-write-through=1'), { code: 'ERR_FAULTS_INVALID' });
t.same(parseFaults('gate-open,journal-write-through'), { gateOpen: true, journalWriteThrough: true });
t.same(parseFaults('plain-stream,hold-migrate-trigger'), { plainStream: true, holdMigrateTrigger: true });
