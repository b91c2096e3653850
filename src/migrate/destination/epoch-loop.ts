/**
 * The destination's epoch loop, from the source's baseline hashes to the completion request:
 * every checkpoint.intervalMs a barrier — stop, collect the dirty pages with their bytes,
 * save the device state, seal the outputs (gates, journal), cont — then checkpoint k goes to
 * the source while epoch k+1 runs. Up to checkpoint.window checkpoints are in flight at once
 * (../window.ts), sent strictly in order, so a large checkpoint does not lengthen the next
 * epoch; ACK(k) (handled by ../destination.ts) releases the outputs of every epoch <= k.
 * Once QEMU's stream is complete and every checkpoint is acknowledged, the last one taken is
 * the final one and the loop asks the source to complete (../completion/destination.ts).
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { checkpointMessages } from '../../checkpoint/assembler.ts';
import type { Checkpoint } from '../../checkpoint/assembler.ts';
import type { DiskExtent } from '../../epoch/outputs.ts';
import { createTracker } from '../../memory/select.ts';
import type { DirtyPages } from '../../native.ts';
import { cont, queryMigrate, saveDevicesState, stop } from '../../qemu/commands.ts';
import type { QmpExecutor } from '../../qemu/commands.ts';
import { deferred, nowMs, sleep } from '../../util/time.ts';
import { completionHeld, requestCompletion } from '../completion/destination.ts';
import { CheckpointWindow } from '../window.ts';
import type { DestContext } from './context.ts';
import { failMigration } from './fence.ts';

/** Page entries per PAGES message: 1024 pages = 4 MiB of data at most. */
const PAGES_PER_MESSAGE = 1024;

/** How one barrier went (ms), and what it left in flight; logged and sent as EPOCH-STATS. */
interface BarrierStats {
  epoch: number;
  pauseMs: number;
  stopMs: number;
  collectMs: number;
  saveMs: number;
  contMs: number;
  /** Taken and unacknowledged when this one was taken (itself included). */
  inflight: number;
  /** What the guest wrote to its disk here up to this barrier (the journal's count). */
  guestDiskBytes: number;
}

/** What a barrier took: checkpoint k's content. */
interface Taken {
  pages: DirtyPages;
  disk: DiskExtent[];
  devstate: Buffer;
  stats: Omit<BarrierStats, 'inflight'>;
}

/**
 * After the switchover: wait for the source's baseline hashes, start the dirty tracker on
 * them, then run the epoch loop. Returns early when the migration ended meanwhile.
 */
export async function runEpochs(ctx: DestContext): Promise<void> {
  await ctx.hashesDone.promise;
  if (ctx.stopped) return;
  const cfg = ctx.vm.config.checkpoint;
  ctx.tracker = await createTracker(cfg.dirtyTracker, {
    ramPath: ctx.vm.ramFile,
    ramBytes: ctx.vm.ramBytes,
    qemuPid: ctx.vm.qemu!.pid,
    threads: cfg.hashThreads,
  });
  await ctx.tracker.start(ctx.table);
  ctx.log.info('dirty tracker started', { tracker: ctx.tracker.kind });
  if (ctx.faults.delayFirstCheckpointMs) await sleep(ctx.faults.delayFirstCheckpointMs);
  await epochLoop(ctx);
}

/** Checkpoints go out strictly in order, one after the other, while later epochs run. */
class SendQueue {
  #tail: Promise<void> = Promise.resolve();
  /** The first send that failed: the loop throws it at its next step. */
  error: unknown;
  readonly #ctx: DestContext;

  constructor(ctx: DestContext) {
    this.#ctx = ctx;
  }

  push(epoch: number, taken: Taken, stats: BarrierStats): void {
    const ctx = this.#ctx;
    this.#tail = this.#tail.then(async () => {
      if (ctx.stopped || this.error) return;
      try {
        await sendCheckpoint(ctx, epoch, taken, stats);
      } catch (e) {
        this.error ??= e;
        // The loop may be waiting for room (an ACK that cannot come now): fail the window.
        if (!ctx.stopped) void failMigration(ctx, e);
      }
    });
  }

  /** Every checkpoint queued is sent (or the first failure is thrown). */
  async flushed(): Promise<void> {
    await this.#tail;
    if (this.error) throw this.error;
  }
}

async function epochLoop(ctx: DestContext): Promise<void> {
  const qmp = ctx.vm.qemu!.qmp;
  const devPath = path.join(ctx.vm.dir, 'devstate.out');
  const cfg = ctx.vm.config.checkpoint;
  const window = new CheckpointWindow(Math.min(cfg.window, ctx.opts.sourceWindow ?? 1));
  ctx.window = window;
  const queue = new SendQueue(ctx);
  /** QEMU's incoming stream completed (it said so once; it stays so). */
  let qemuCompleted = false;
  for (let epoch = 1; !ctx.stopped; epoch++) {
    // At most window.size checkpoints unacknowledged: the source's memory and the
    // guest's held outputs stay bounded when the link or the source falls behind.
    await window.room();
    if (ctx.stopped) return;
    if (queue.error) throw queue.error;
    // Before any QMP command: a full packet gate stops reading QEMU's NIC socket, and
    // QEMU 7.2 then blocks its main loop in that write (it would answer neither
    // query-migrate nor `stop`); quiesce lets the outputs read on until seal().
    ctx.outputs.quiesce?.();
    // The migration stream is complete once QEMU says so. (The incoming side emits
    // MIGRATION events only with the 'events' capability, so ask.)
    if (!qemuCompleted && (await queryMigrate(qmp)).status === 'completed') qemuCompleted = true;
    // The last checkpoint taken is the final one once the stream is complete: the source
    // needs nothing more from its QEMU, and everything the guest does from here on stays
    // held until the source has recorded completion (docs/completion.md). With none taken
    // yet, this barrier's checkpoint is the final one.
    const final = qemuCompleted && !completionHeld(ctx);
    if (final && window.lastTaken >= 1) {
      // No barrier follows: the journal's and gates' bounds hold again for the
      // whole completion phase (quiesce() had lifted them for a `stop`).
      ctx.outputs.unquiesce?.();
      break;
    }
    const taken = await barrier(ctx, qmp, epoch, devPath);
    void window.take(epoch);
    queue.push(epoch, taken, { ...taken.stats, inflight: window.inflight.length });
    if (final) break;
    await sleep(cfg.intervalMs);
  }
  if (ctx.stopped) return;
  // Completion handshake (docs/completion.md): only after every checkpoint taken is
  // acknowledged, so the final one is the last in order and the source holds it whole.
  await queue.flushed();
  await window.drained();
  if (ctx.stopped) return;
  await requestCompletion(ctx, window.lastTaken);
}

/**
 * Barrier k: stop, collect the pages dirtied in epoch k with their bytes, save the device
 * state, seal the outputs, cont. DestContext.barrierSince counts only the QEMU commands
 * (the heartbeat stops if one hangs); the scan is local work that always ends.
 */
async function barrier(ctx: DestContext, qmp: QmpExecutor, epoch: number, devPath: string): Promise<Taken> {
  const t0 = nowMs();
  ctx.barrierSince = t0;
  ctx.barrierEnd = deferred<void>();
  await stop(qmp);
  const tStopped = nowMs();
  // One native pass: the changed pages and their bytes (no second read of RAM). Local
  // work that always ends: the heartbeat goes on however long it takes.
  ctx.barrierSince = null;
  const slow = slowScanMs(ctx, epoch);
  const pages = await ctx.tracker!.collectPages(slow ? { faultDelayMs: slow } : undefined);
  const t1 = nowMs();
  ctx.barrierSince = t1;
  await saveDevicesState(qmp, devPath, false);
  // Every output's epoch boundary is set within this call, with the VM stopped; the
  // journal builds epoch k's extents (a copy of what it wrote) after `cont` is on its way,
  // outside the guest's pause. Settled into a value at once: a failure is thrown below.
  const sealing = ctx.outputs.seal(epoch).then(
    (extents) => ({ extents }),
    (error: unknown) => ({ error }),
  );
  // the VM is stopped: exactly what the guest wrote here up to barrier k
  const guestDiskBytes = ctx.journal?.stats.journaledBytes ?? 0;
  const t2 = nowMs();
  await cont(qmp);
  const tCont = nowMs();
  ctx.barrierSince = null;
  ctx.barrierEnd.resolve();
  const sealed = await sealing;
  if ('error' in sealed) throw sealed.error;
  const disk = sealed.extents;
  // Read after cont: only the next barrier rewrites the file.
  const devstate = await fs.readFile(devPath);
  const stats = {
    epoch,
    pauseMs: tCont - t0,
    stopMs: tStopped - t0,
    collectMs: t1 - tStopped,
    saveMs: t2 - t1,
    contMs: tCont - t2,
    guestDiskBytes,
  };
  return { pages, disk, devstate, stats };
}

/** Fault injection (slow-scan-ms): the delay inside this epoch's native scan, if any. */
function slowScanMs(ctx: DestContext, epoch: number): number | undefined {
  const f = ctx.faults;
  const slow = f.slowScanMs && epoch === (f.slowScanEpoch ?? 1) ? f.slowScanMs : undefined;
  if (slow) ctx.log.warn('fault injection: slow dirty-page scan', { epoch, ms: slow });
  return slow;
}

/** Fault injection (corrupt-epoch / truncate-epoch): what to do to this checkpoint's DEVSTATE frame. */
function devstateFault(ctx: DestContext, epoch: number): 'corrupt' | 'truncate' | undefined {
  const f = ctx.faults;
  return f.corruptEpoch === epoch ? 'corrupt' : f.truncateEpoch === epoch ? 'truncate' : undefined;
}

/** Checkpoint k on the channel, in order, then its figures (logged, and EPOCH-STATS to the source). */
async function sendCheckpoint(ctx: DestContext, epoch: number, taken: Taken, stats: BarrierStats): Promise<void> {
  const { pages, disk, devstate } = taken;
  const tSend = nowMs();
  // The tracker left zero pages out of the data already (the wire form carries them as flags).
  const ckpt: Checkpoint = { epoch, pfns: pages.pfns, zeroMask: pages.zero, data: pages.data, disk, devstate };
  // Fault injection hits DEVSTATE: every checkpoint has one, even with no dirty page.
  const inject = devstateFault(ctx, epoch);
  let bytes = 0;
  for (const msg of checkpointMessages(ckpt, { maxPagesPerMessage: PAGES_PER_MESSAGE })) {
    if (ctx.stopped) return;
    if (msg.type === 'pages') bytes += msg.data.length + msg.pfns.length * 4;
    else if (msg.type === 'disk' || msg.type === 'devstate') bytes += msg.data.length;
    else if (msg.type === 'diskzero') bytes += 24;
    if (msg.type === 'devstate' && inject) {
      ctx.log.warn(`fault injection: ${inject} checkpoint`, { epoch });
      await ctx.ch.sendInjected(msg, inject);
      return;
    }
    await ctx.ch.send(msg);
  }
  ctx.window?.sent(epoch, nowMs());
  logSent(ctx, taken, stats, bytes, nowMs() - tSend);
  await ctx.ch.send({
    type: 'control',
    body: {
      kind: 'epoch-stats',
      epoch,
      pauseMs: stats.pauseMs,
      pages: pages.pfns.length,
      bytes,
      collectMs: stats.collectMs,
      saveMs: stats.saveMs,
      tracker: ctx.tracker!.kind,
    },
  });
}

function logSent(ctx: DestContext, taken: Taken, stats: BarrierStats, bytes: number, sendMs: number): void {
  const r2 = (v: number) => +v.toFixed(2);
  const disk = taken.disk;
  ctx.log.debug('checkpoint sent', {
    epoch: stats.epoch,
    pages: taken.pages.pfns.length,
    bytes,
    diskBytes: disk.reduce((n, x) => n + (x.zero ? 0 : x.data.length), 0),
    // TRIM / WRITE_ZEROES: DISKZERO messages, 24 bytes each whatever the length
    diskZeroBytes: disk.reduce((n, x) => n + (x.zero ? x.length : 0), 0),
    diskExtents: disk.length,
    guestDiskBytes: stats.guestDiskBytes,
    pauseMs: r2(stats.pauseMs),
    stopMs: r2(stats.stopMs),
    collectMs: r2(stats.collectMs),
    saveMs: r2(stats.saveMs),
    contMs: r2(stats.contMs),
    sendMs: r2(sendMs),
    // taken and unacknowledged when this one was taken (itself included)
    inflight: stats.inflight,
  });
}
