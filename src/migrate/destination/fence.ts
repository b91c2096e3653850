/**
 * How the destination stops for good (fence: kill its QEMU, drop every held output; the source
 * owns the VM) and what makes it: the lease watch (source silent, or a checkpoint left
 * unacknowledged past the failover timeout), a failure of this side (abort to the source,
 * then fence), or the source's word (ABORT, resolve rolled-back). While the completion
 * handshake or a source's hold is under way this side never fences on its own: it pauses
 * the guest and waits for the source's answer (../completion/destination.ts). fenceVm, the
 * fence's steps on the VM itself, is also how a restarted sidecar fences (daemon recovery).
 */
import fs from 'node:fs/promises';
import { TetherError } from '../../errors.ts';
import { stop } from '../../qemu/commands.ts';
import { errorFields, ignored } from '../../util/log.ts';
import type { Logger } from '../../util/log.ts';
import { nowMs, sleep } from '../../util/time.ts';
import type { VmInstance } from '../../vm/instance.ts';
import { completingRecordPath, pauseForAnswer } from '../completion/destination.ts';
import type { DestContext } from './context.ts';

/** Source heartbeats come every 200 ms; this side checks its lease four times as often. */
const FENCE_CHECK_MS = 50;
/** This side's heartbeats keep the source's lease alive between checkpoints. */
const HEARTBEAT_MS = 200;

/**
 * Stop the VM here for good and drop every held output; the source owns the VM.
 * `bySource`: the source decided it (ABORT or resolve rolled-back while this side waits for
 * its word) — the one case in which a completing (or held) destination fences.
 */
export async function fence(ctx: DestContext, reason: string, err?: unknown, bySource = false): Promise<void> {
  if (ctx.stopped) return;
  if (ctx.waitsForSource && !bySource) {
    // The source may have recorded completion (or given a rollback up) already: killing
    // here could lose the VM.
    ctx.log.warn('not fencing during the completion handshake; pausing until the source answers', { reason });
    await pauseForAnswer(ctx, reason);
    if (reason === 'operator-abort') {
      throw new TetherError('ERR_COMPLETING', 'the completion handshake is under way; only the source decides now');
    }
    return;
  }
  ctx.phase.to('fencing', { reason });
  ctx.stopTimers();
  ctx.log.warn('fencing: stopping the VM here, dropping held outputs', { reason, ...(err ? { error: errorFields(err) } : {}) });
  ctx.outputs.discard();
  ctx.window?.fail(new TetherError('ERR_FENCED', reason));
  ctx.hashesDone.resolve(); // unblock a run() still waiting for the baseline
  await fenceVm(ctx.vm, ctx.log, async () => {
    ctx.guard?.disarm();
    await ctx.tls?.removeKeys(); // the object went with the QEMU
    await ctx.tracker?.close().catch(ignored(ctx.log, 'the tracker is closed at the end whatever its state'));
  });
  ctx.phase.to('fenced', { reason });
  ctx.ch.close();
  ctx.done.resolve('fenced');
}

/**
 * The fence's steps on the VM itself (the source owns it): its QEMU stopped and killed, then
 * `afterKill` (the live migration's guard, TLS keys, tracker), its RAM removed, the VM shown
 * fenced, its records dropped. Each failure is logged and the fence goes on. The steps of the
 * live fence, and of a restarted sidecar's (daemon recovery), which kills a QEMU it did not
 * adopt itself first.
 */
export async function fenceVm(vm: VmInstance, log: Logger, afterKill?: () => Promise<void>): Promise<void> {
  const q = vm.qemu;
  if (q && !q.hasExited) {
    await Promise.race([stop(q.qmp).catch(ignored(log, 'QEMU is killed next anyway')), sleep(500)]);
    await q.kill().catch((e: unknown) => log.warn('killing the fenced QEMU failed', { error: errorFields(e) }));
  }
  await afterKill?.();
  await vm.removeRam().catch((e: unknown) => log.warn('removing the fenced RAM file failed', { error: errorFields(e) }));
  vm.place = 'fenced';
  await dropRecords(vm, log);
}

/**
 * A fenced migration's records go, its completion request before its marker: a restart finds
 * nothing to resume, and one in between finds the marker alone, which fences again (a request
 * without its marker reads as no migration: the VM would be listed stopped here).
 */
async function dropRecords(vm: VmInstance, log: Logger): Promise<void> {
  await fs
    .rm(completingRecordPath(vm), { force: true })
    .catch((e: unknown) => log.warn('removing the completion request failed', { error: errorFields(e) }));
  await vm.setMigrationMarker(null).catch((e: unknown) => log.warn('removing the migration marker failed', { error: errorFields(e) }));
}

/** The code an ABORT carries for a failure of this side (the error's own, else ERR_DESTINATION). */
function abortCode(e: unknown): string {
  const code = (e as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : 'ERR_DESTINATION';
}

/** A failure of this side (setup, barrier, send): tell the source (ABORT), then fence. */
export async function failMigration(ctx: DestContext, e: unknown): Promise<void> {
  if (ctx.stopped) return;
  ctx.log.error('incoming migration failed', { error: errorFields(e) });
  await ctx.ch
    .send({ type: 'abort', code: abortCode(e), reason: e instanceof Error ? e.message : String(e) })
    .catch(ignored(ctx.log, 'the channel may be closed: the source then fails over on silence'));
  await fence(ctx, 'destination-error', e);
}

/**
 * The VM runs here: watch the source's lease (checkFence) and keep this side's alive
 * (heartbeats), until the migration ends (DestContext.stopTimers).
 */
export function startLease(ctx: DestContext): void {
  ctx.lastHeard = nowMs();
  ctx.fenceTimer = setInterval(() => checkFence(ctx), FENCE_CHECK_MS);
  // Heartbeats keep the source's lease alive between checkpoints (and while the
  // first one waits for the baseline hashes).
  ctx.heartbeatTimer = setInterval(() => {
    // A barrier stuck in QEMU (a vCPU stuck on a page the source can no longer send)
    // silences the heartbeat, so the source's lease runs out. The scan does not count.
    const stuck = ctx.barrierSince !== null && nowMs() - ctx.barrierSince > ctx.vm.config.checkpoint.fenceTimeoutMs / 2;
    if (!ctx.stopped && !ctx.ch.closed && !stuck) {
      ctx.ch
        .send({ type: 'heartbeat', epoch: ctx.window?.lastTaken ?? 0, sentAt: Date.now() })
        .catch(ignored(ctx.log, 'the channel may be closing: its close event ends the migration'));
    }
  }, HEARTBEAT_MS);
}

/**
 * Fence when the source has gone silent (its heartbeats come every 200 ms, so
 * silence means a dead source or a cut link), or when it stays alive but
 * leaves a fully sent checkpoint unacknowledged past the failover timeout.
 * The clock never counts this side's own pause or send time, so one large
 * checkpoint does not trip it. fenceTimeoutMs < failoverTimeoutMs: this side
 * stops before the source resumes after a silence.
 */
function checkFence(ctx: DestContext): void {
  if (ctx.stopped) return;
  const now = nowMs();
  const cfg = ctx.vm.config.checkpoint;
  const silent = now - ctx.lastHeard;
  if (ctx.waitsForSource) {
    // Paused before the source may decide anything on its lease (fence < failover timeout).
    if (silent > cfg.fenceTimeoutMs) void pauseForAnswer(ctx, 'silence');
    return;
  }
  if (silent > cfg.fenceTimeoutMs) {
    void fence(ctx, 'no-ack', new TetherError('ERR_FENCED', `nothing heard from the source for ${Math.round(silent)} ms`));
    return;
  }
  const oldest = ctx.window?.oldestUnackedSentAt();
  if (oldest !== undefined && now - oldest.sentAt > cfg.failoverTimeoutMs) {
    void fence(
      ctx,
      'no-ack',
      new TetherError('ERR_FENCED', `checkpoint ${oldest.epoch} unacknowledged for ${Math.round(now - oldest.sentAt)} ms`),
    );
  }
}
