/**
 * Pre-copy and switchover: QEMU's migration is configured (post-copy, the pause before
 * switchover, stream TLS) and started; after the pre-copy time the VM stops, checkpoint 0
 * (the source's own device state) is recorded, QEMU hands the VM over (migrate-continue) and
 * post-copy runs. The destination's baseline (a hash per page) goes out last. Phases:
 * prepared → precopy → switchover → postcopy.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { PAGE_SIZE } from '../../checkpoint/messages.ts';
import { TetherError } from '../../errors.ts';
import { hashRamFile } from '../../memory/ram.ts';
import type { PeerChannel } from '../../peer/channel.ts';
import {
  migrate,
  migrateContinue,
  migrateSetCapabilities,
  migrateSetParameters,
  migrateStartPostcopy,
  queryMigrate,
  saveDevicesState,
} from '../../qemu/commands.ts';
import type { MigrationInfo } from '../../qemu/commands.ts';
import { qmpTimeMs, type QmpTimestamp } from '../../qmp/codec.ts';
import type { QmpClient } from '../../qmp/client.ts';
import { Nap, nowMs, sleep } from '../../util/time.ts';
import { holdMigrateTrigger } from '../faults.ts';
import { StreamTls, streamPsk } from '../stream-tls.ts';
import { checkLease } from './apply.ts';
import { HEARTBEAT_MS } from './context.ts';
import type { SourceRun } from './context.ts';

/** Pages per HASHES message: 64 Ki pages = 512 KiB of hashes. */
const HASH_CHUNK_PAGES = 65536;
const PROGRESS_MS = 500;
/**
 * QEMU max-bandwidth (bytes/s) while a TCG migration with `precopyMs: 0` waits for its
 * switchover: QEMU allows max-bandwidth / 10 bytes per 100 ms window, which the migration
 * setup's own bytes already exceed, so no RAM page goes before the stop (measured:
 * ram.transferred 0 at pre-switchover). The price: the migration thread sleeps out that
 * window before it sees migrate-start-postcopy, ~100 ms of pre-copy with the guest running.
 */
const PRECOPY_TRICKLE = 10;

/** From 'prepared' to 'postcopy' with the baseline sent; returns early when a decision ends the migration. */
export async function precopyAndSwitchover(run: SourceRun, uri: string): Promise<void> {
  const vm = run.vm;
  const qmp = vm.qemu!.qmp;
  const ch = run.channel!;
  await configureStream(run, qmp);
  await holdMigrateTrigger(run.faults, vm.dir, run.log, () => run.live);
  if (!run.live) return;
  run.phase.to('precopy');
  await migrate(qmp, uri);
  run.every(PROGRESS_MS, () => void reportProgress(run));

  await sleep(vm.config.migration.precopyMs);
  if (!run.live) return;
  await stopForSwitchover(run, qmp);
  if (!run.live) return;
  // Checkpoint 0: the source's own state, saved while paused before switchover.
  const tmp = path.join(vm.dir, 'checkpoint0.devstate.tmp');
  await saveDevicesState(qmp, tmp, false);
  const dev0 = await fs.readFile(tmp);
  await fs.rm(tmp, { force: true });
  await run.store.init0(dev0);
  run.appliedEpoch = 0;
  if (!run.live) return;
  run.continued = true;
  await migrateContinue(qmp, 'pre-switchover');
  run.switchoverAt = nowMs();
  run.lastHeard = nowMs();
  run.phase.to('postcopy');
  run.progress({ phase: 'postcopy', appliedEpoch: 0 });
  run.every(100, () => checkLease(run));
  run.every(HEARTBEAT_MS, () => {
    if (run.live && !ch.closed) run.heartbeat(ch);
  });
  await sendBaseline(run, ch);
}

/** Capabilities, bandwidth and the stream's TLS credentials, before `migrate`. */
async function configureStream(run: SourceRun, qmp: QmpClient): Promise<void> {
  const vm = run.vm;
  await migrateSetCapabilities(qmp, [
    { capability: 'postcopy-ram', state: true },
    { capability: 'pause-before-switchover', state: true },
    // MIGRATION events: the pause before switchover is seen at once, not at the next poll
    { capability: 'events', state: true },
  ]);
  const bw = vm.config.migration.maxBandwidth;
  const params: Record<string, number> = bw > 0 ? { 'max-bandwidth': bw, 'max-postcopy-bandwidth': bw } : {};
  // No pre-copy wanted, under TCG: let QEMU send no RAM before the switchover. QEMU before
  // 9.0 loses, under TCG, the dirty bit of a page the guest rewrites after pre-copy sent it
  // (upstream fix 03bfc2188f, see docs/design.md), and such a page would reach the
  // destination stale. Post-copy then runs at max-postcopy-bandwidth (0 = unlimited).
  if (vm.config.migration.precopyMs === 0 && vm.config.qemu.accel === 'tcg') params['max-bandwidth'] = PRECOPY_TRICKLE;
  if (Object.keys(params).length > 0) await migrateSetParameters(qmp, params);
  // The stream is TLS with this migration's key: the destination's QEMU refuses it otherwise.
  if (!run.faults.plainStream) {
    run.tls = await StreamTls.setUp({
      qmp,
      vmDir: vm.dir,
      endpoint: 'client',
      psk: streamPsk(run.opts.host.peer.key, run.id),
      log: run.log,
    });
  } else run.log.warn('fault injection: the migration stream goes without TLS');
}

/** migrate-start-postcopy, until QEMU pauses before switchover: phase 'switchover', with QEMU's own stop time. */
async function stopForSwitchover(run: SourceRun, qmp: QmpClient): Promise<void> {
  // QEMU's own time of the stop that starts the switchover blackout (QMP event timestamp).
  let qemuStopAt: number | undefined;
  let precopyBytes: number | undefined;
  const onStop = (name: string, _d: unknown, ts: QmpTimestamp | undefined) => {
    if (name === 'STOP' && qemuStopAt === undefined && ts) qemuStopAt = qmpTimeMs(ts);
  };
  qmp.on('event', onStop);
  try {
    await migrateStartPostcopy(qmp);
    precopyBytes = (await waitMigrationStatus(run, 'pre-switchover')).ram?.transferred;
  } finally {
    qmp.off('event', onStop);
  }
  if (!run.live) return;
  run.phase.to('switchover', {
    ...(qemuStopAt === undefined ? {} : { qemuStopAt }),
    ...(precopyBytes === undefined ? {} : { precopyBytes }),
  });
}

/**
 * The destination's baseline: a hash per page of the RAM file as of checkpoint 0. The RAM
 * file is frozen now (QEMU is past switchover; only checkpoint pages change it).
 */
async function sendBaseline(run: SourceRun, ch: PeerChannel): Promise<void> {
  const vm = run.vm;
  const pages = vm.ramBytes / PAGE_SIZE;
  const table = await hashRamFile(vm.ramFile, vm.ramBytes, { threads: vm.config.checkpoint.hashThreads });
  for (let start = 0; start < pages; start += HASH_CHUNK_PAGES) {
    const n = Math.min(HASH_CHUNK_PAGES, pages - start);
    await ch.send({ type: 'hashes', startPfn: start, hashes: table.subarray(start * 8, (start + n) * 8) });
  }
  await ch.send({ type: 'control', body: { kind: 'hashes-done', pages } });
}

/**
 * Polls query-migrate until `want`; a MIGRATION event (capability `events`) cuts the wait
 * short, so the switchover's stop is acted on at once rather than up to a poll later.
 */
async function waitMigrationStatus(run: SourceRun, want: string): Promise<MigrationInfo> {
  const q = run.vm.qemu!;
  const nap = new Nap();
  const onEvent = (name: string) => {
    if (name === 'MIGRATION') nap.wake();
  };
  q.qmp.on('event', onEvent);
  try {
    for (;;) {
      if (!run.live) return {};
      const m = await queryMigrate(q.qmp);
      if (m.status === want) return m;
      if (m.status === 'failed' || m.status === 'cancelled') {
        throw new TetherError('ERR_QEMU_MIGRATION_FAILED', `source QEMU migration ${m.status}: ${m['error-desc'] ?? ''}`);
      }
      await nap.nap(10);
    }
  } finally {
    q.qmp.off('event', onEvent);
  }
}

/** Progress for `tether migrate` (best effort: a slow or failed query is skipped). */
async function reportProgress(run: SourceRun): Promise<void> {
  const q = run.vm.qemu;
  if (!run.live || !q || q.hasExited) return;
  let m: MigrationInfo;
  try {
    m = await queryMigrate(q.qmp, { timeoutMs: 2000 });
  } catch (e) {
    run.log.debug('progress skipped: query-migrate did not answer', { error: (e as Error).message });
    return;
  }
  run.progress({
    phase: run.phase.state,
    qemuStatus: m.status,
    ram: m.ram
      ? {
          transferred: m.ram.transferred,
          remaining: m.ram.remaining,
          total: m.ram.total,
          // pages the destination faulted on and asked for out of order, so far
          postcopyRequests: m.ram['postcopy-requests'],
        }
      : undefined,
    appliedEpoch: run.appliedEpoch,
    lastPauseMs: run.lastPauseMs,
  });
}
