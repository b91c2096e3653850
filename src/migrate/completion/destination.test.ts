import fs from 'node:fs';
import t from 'tap';
import { testHost } from '../migrate.test-util.ts';
import type { Test } from 'tap';
import { loadVmConfig } from '../../config/load.ts';
import { newMigrationId } from '../../epoch/id.ts';
import type { PeerChannel } from '../../peer/channel.ts';
import { writeCompletingRecord } from '../../checkpoint/store.ts';
import type { BlockJournal } from '../../disk/journal.ts';
import { nullLogger } from '../../util/log.ts';
import { deferred } from '../../util/time.ts';
import { VmInstance } from '../../vm/instance.ts';
import { DestContext } from '../destination/context.ts';
import { completingRecordPath, decideAnswer, decideResolve, runHere, staleResolve } from './destination.ts';

/** A destination's context with no QEMU and no channel: the decisions only read its phase and flags. */
function context(t: Test, onStaleResolve?: () => void): DestContext {
  const { host, vmFile: file } = testHost(t, 'tether-dest-');
  return new DestContext({
    host,
    channel: {} as PeerChannel, // never used by the decisions
    migrationId: newMigrationId(),
    vmConfig: loadVmConfig(file),
    sendConfiguration: true,
    log: nullLogger,
    faults: {},
    ...(onStaleResolve ? { onStaleResolve } : {}),
  });
}

t.test('staleResolve refuses another migration id and passes the own one', async (t) => {
  const id = newMigrationId();
  t.equal(staleResolve(id, id), null);
  t.match(staleResolve(id, newMigrationId()), { known: false, code: 'ERR_MIGRATION_ID_MISMATCH' });
  t.match(staleResolve(null, id), { known: false, code: 'ERR_MIGRATION_ID_MISMATCH' });
});

t.test('an answer for another migration is refused, counted and never acted on', async (t) => {
  let stale = 0;
  const ctx = context(t, () => stale++);
  ctx.phase.to('incoming');
  ctx.phase.to('running');
  for (const outcome of ['completed', 'rolled-back'] as const) {
    const d = decideResolve(ctx, { migrationId: newMigrationId(), outcome, epoch: 1 });
    t.match(d, { answer: { known: false, code: 'ERR_MIGRATION_ID_MISMATCH' } }, outcome);
    t.equal(d.act, undefined, `${outcome}: neither fence nor finish`);
  }
  t.equal(stale, 2);
});

t.test('rolled-back fences; completed acts only on the final epoch this side asked for', async (t) => {
  const ctx = context(t);
  ctx.phase.to('incoming');
  ctx.phase.to('running');
  const ask = (outcome: 'completed' | 'rolled-back', epoch: number) => decideResolve(ctx, { migrationId: ctx.id, outcome, epoch });
  t.match(ask('completed', 3), { answer: { known: false, code: 'ERR_NO_MIGRATION' } }, 'no request made yet');
  t.equal(ask('completed', 3).act, undefined);
  t.match(ask('rolled-back', 3), { answer: { known: true }, act: 'fence' });
  t.notOk(ctx.waitsForSource);
  ctx.finalEpoch = 5;
  ctx.phase.to('completing');
  t.ok(ctx.waitsForSource, 'completing: waits for the source');
  t.notOk(ctx.stopped);
  t.match(ask('completed', 4), { answer: { known: false, code: 'ERR_NO_MIGRATION' } }, 'another final epoch');
  t.match(ask('completed', 5), { answer: { known: true }, act: 'finish' });
  ctx.phase.to('handover');
  t.ok(ctx.stopped, 'handover: stopped');
  t.match(ask('completed', 5), { answer: { known: false } }, 'a repeat during the hand-over is not acted on twice');
  ctx.phase.to('completed');
  t.match(ask('completed', 5), { answer: { known: true } }, 'a repeated answer after completion is confirmed');
  t.equal(ask('completed', 5).act, undefined);
  t.match(ask('rolled-back', 5), { answer: { known: false, code: 'ERR_NO_MIGRATION' } }, 'rolled-back after completed');
});

t.test('held: resolve completed at any epoch continues the VM here', async (t) => {
  const ctx = context(t);
  ctx.phase.to('incoming');
  ctx.phase.to('running');
  ctx.held = true;
  t.ok(ctx.waitsForSource);
  t.match(decideResolve(ctx, { migrationId: ctx.id, outcome: 'completed', epoch: 9 }), { answer: { known: true }, act: 'finish' });
});

t.test('fencing and fenced are stopped; no way back from them', async (t) => {
  const ctx = context(t);
  ctx.phase.to('incoming');
  ctx.phase.to('fencing');
  t.ok(ctx.stopped);
  t.notOk(ctx.phase.can('running'));
  t.notOk(ctx.phase.can('handover'));
  ctx.phase.to('fenced');
  t.ok(ctx.stopped);
});

t.test("decideAnswer on a restarted sidecar's state: its own request's answer only", async (t) => {
  // What daemon recovery decides on: the final epoch it asked for, never held, not completed yet.
  const id = newMigrationId();
  const s = { id, finalEpoch: 5, completed: false, held: false, stopped: false };
  let stale = 0;
  const ask = (migrationId: string, outcome: 'completed' | 'rolled-back', epoch: number) =>
    decideAnswer(s, { migrationId, outcome, epoch }, nullLogger, () => stale++);
  t.match(ask(newMigrationId(), 'completed', 5), { answer: { known: false, code: 'ERR_MIGRATION_ID_MISMATCH' } });
  t.equal(ask(newMigrationId(), 'rolled-back', 5).act, undefined, 'a stale rolled-back fences nothing');
  t.equal(stale, 2, 'each stale answer counted');
  t.match(ask(id, 'completed', 4), { answer: { known: false, code: 'ERR_NO_MIGRATION' } }, 'another final epoch');
  t.equal(ask(id, 'completed', 4).act, undefined);
  t.match(ask(id, 'completed', 5), { answer: { known: true }, act: 'finish' });
  t.match(ask(id, 'rolled-back', 2), { answer: { known: true }, act: 'fence' }, 'rolled-back at any epoch');
});

/** A VM with no QEMU whose destination asked to complete (marker + completion request), and a journal double. */
async function handover(t: Test, mark: () => Promise<void>) {
  const vm = context(t).vm;
  await vm.prepareDirs();
  await vm.setMigrationMarker({ role: 'destination', migrationId: newMigrationId(), qemuPid: null, peer: '127.0.0.1:1', startedAt: '' });
  await writeCompletingRecord(completingRecordPath(vm), 5);
  const steps: string[] = [];
  const drain = deferred<void>();
  const journal = {
    markCompleted: async () => {
      steps.push('mark');
      await mark();
    },
    passThrough: () => steps.push('passThrough'),
    drained: async () => {
      steps.push('drained');
      await drain.promise;
    },
  } as unknown as BlockJournal;
  const records = async () => ({
    marker: (await VmInstance.readMarker(vm.dir)) !== null,
    request: fs.existsSync(completingRecordPath(vm)),
  });
  const release = () => {
    journal.passThrough();
    vm.place = 'running';
  };
  return { vm, journal, steps, drain, records, release };
}

t.test('runHere: once the log says completed, the records go without waiting for the write-back', async (t) => {
  const h = await handover(t, async () => {});
  await runHere({ vm: h.vm, journal: h.journal, log: nullLogger, paused: true, release: h.release, afterStep: () => {} }, 5);
  t.same(h.steps, ['mark', 'passThrough'], 'no QEMU, no disk window: nothing waits for the write-back');
  t.equal(h.vm.place, 'running');
  t.same(await h.records(), { marker: false, request: false });
});

t.test('runHere: a failed mark in the log still runs the VM here; the records wait for the write-back', async (t) => {
  const h = await handover(t, async () => {
    throw new Error('injected: the journal log cannot be written');
  });
  const done = runHere({ vm: h.vm, journal: h.journal, log: nullLogger, paused: true, release: h.release, afterStep: () => {} }, 5);
  while (!h.steps.includes('drained')) await new Promise((r) => setImmediate(r));
  t.same(h.steps, ['mark', 'passThrough', 'drained']);
  t.equal(h.vm.place, 'running', 'the VM runs here whatever the log');
  t.same(await h.records(), { marker: true, request: true }, 'a restart meanwhile must not serve the image pass-through');
  h.drain.resolve();
  await done;
  t.same(await h.records(), { marker: false, request: false }, 'dropped once the journal is in the image');
});
