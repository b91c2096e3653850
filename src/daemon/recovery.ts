/**
 * After a sidecar restart: find every VM this host's records name, and decide each one the
 * only safe way.
 *
 * Step 1 (readRecords, before the sockets open): read every vm.json and list its VM as
 * `recovering`; nothing is touched. Step 2 (recoverOne, every VM at once, the sockets open):
 *  - left unrecovered by an earlier start: stays so, until `tether vm adopt`/`forget`;
 *  - the disk journal's log first (restartDisk): written back, rebuilt or dropped, never the
 *    image pass-through while the outcome of a completion request is open;
 *  - a source's marker: recovery-source.ts (completed / restored by a rollback / mid-migration);
 *  - a destination's marker: recovery-destination.ts (awaiting the answer / fenced);
 *  - no marker: a running QEMU is adopted (adopted.ts), none means `stopped`.
 * QEMUs are the ones the records name by pid + start time (qemu-records.ts), nothing else.
 * Whatever cannot be decided, or fails, leaves the VM `unrecovered` with its cause.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { readCompletingRecord } from '../checkpoint/store.ts';
import { parseVmConfig } from '../config/load.ts';
import { FileBlockDevice } from '../disk/file-device.ts';
import type { BlockJournal } from '../disk/journal.ts';
import { restartJournal } from '../disk/journal-restart.ts';
import { TetherError } from '../errors.ts';
import { completingRecordPath } from '../migrate/destination.ts';
import { settleStandbys } from '../migrate/standby.ts';
import { identityAlive } from '../qemu/process.ts';
import type { QemuIdentity } from '../qemu/process.ts';
import { errorFields } from '../util/log.ts';
import type { Logger } from '../util/log.ts';
import { VmInstance } from '../vm/instance.ts';
import type { MigrationMarker, PersistedVm } from '../vm/instance.ts';
import { runAdopted } from './adopted.ts';
import type { DaemonContext } from './context.ts';
import { letGo } from './context.ts';
import { distinct, markerQemu } from './qemu-records.ts';
import { fenceInterrupted, recoverAsked } from './recovery-destination.ts';
import type { DiskAtRestart } from './recovery-destination.ts';
import { recoverSourceSide } from './recovery-source.ts';

/** A VM found in the state directory, listed `recovering`, not yet decided. */
export interface Pending {
  vm: VmInstance;
  saved: PersistedVm;
  dir: string;
  log: Logger;
}

/**
 * Step 1 (before the sockets open): read every VM record and list each VM as `recovering`.
 * A record that cannot be read marks its name damaged: never booted over, never recovered.
 */
export async function readRecords(ctx: DaemonContext): Promise<Pending[]> {
  let names: string[];
  try {
    names = await fs.readdir(ctx.host.stateDir);
  } catch (e) {
    ctx.log.warn('state directory cannot be listed: no VM to recover', { dir: ctx.host.stateDir, error: errorFields(e) });
    return [];
  }
  const out: Pending[] = [];
  for (const name of names) {
    const dir = path.join(ctx.host.stateDir, name);
    const log = ctx.log.child({ vm: name, recovery: true });
    let vm: VmInstance;
    let saved: PersistedVm | null;
    try {
      saved = await VmInstance.readPersisted(dir);
      if (!saved) continue;
      vm = new VmInstance(ctx.host, parseVmConfig(saved.config as unknown as Record<string, unknown>, { baseDir: '/' }), ctx.log);
      if (vm.name !== name) throw new TetherError('ERR_STATE_FILE_CORRUPT', `${dir}/vm.json describes VM ${vm.name}`);
    } catch (e) {
      // Without its record the VM cannot be found again; it must not be booted over either.
      ctx.damaged.add(name);
      log.error('VM record damaged: not recovered, nothing touched; inspect it, then `tether vm forget` it to use the name again', {
        dir,
        error: errorFields(e),
      });
      continue;
    }
    vm.sendConfiguration = saved.sendConfiguration;
    vm.place = 'recovering';
    ctx.vms.set(vm.name, vm);
    out.push({ vm, saved, dir, log });
  }
  return out;
}

/**
 * Step 2: find one VM again. A running QEMU is adopted (the guest does not notice); a
 * migration in progress is resolved by its side's module; a failure leaves it `unrecovered`.
 */
export async function recoverOne(ctx: DaemonContext, { vm, saved, dir, log }: Pending): Promise<void> {
  try {
    const cause = await VmInstance.readUnrecovered(dir);
    if (cause) {
      vm.place = 'unrecovered';
      vm.unrecovered = cause;
      log.error('VM left unrecovered by an earlier start: nothing touched; resolve with `tether vm adopt` or `tether vm forget`', {
        cause: cause as unknown as Record<string, unknown>,
      });
      return;
    }
    const marker = await VmInstance.readMarker(dir);
    // Before anything serves the disk: a journal log left by this host's destination
    // side is written back (the log says completed), rebuilt (completion asked, outcome
    // unknown) or dropped (fenced). Never the image pass-through while the outcome is open.
    const completingEpoch = marker?.role === 'destination' ? await readCompletingRecord(completingRecordPath(vm)) : null;
    const disk = await restartDisk(vm, marker, completingEpoch, log);
    const recorded = await recordedQemu(vm, saved, log);
    const migrating = markerQemu(marker, recorded);
    const keepMarker = await decide(ctx, vm, marker, { recorded, migrating }, completingEpoch, disk, log);
    if (!keepMarker) await vm.setMigrationMarker(null);
    await ctx.nics.settle(vm);
  } catch (e) {
    await leaveUnrecovered(ctx, vm, e, log);
  }
}

/** Which case the records prove, acted on; returns whether the migration marker stays. */
async function decide(
  ctx: DaemonContext,
  vm: VmInstance,
  marker: MigrationMarker | null,
  q: { recorded: QemuIdentity | null; migrating: QemuIdentity | null },
  completingEpoch: number | null,
  disk: DiskAtRestart,
  log: Logger,
): Promise<boolean> {
  if (marker?.role === 'source') return recoverSourceSide(ctx, vm, marker, q.recorded, q.migrating, log);
  if (marker?.role === 'destination' && completingEpoch !== null) {
    await recoverAsked(ctx, vm, q, marker, completingEpoch, disk, log);
    return true;
  }
  if (marker?.role === 'destination') {
    await fenceInterrupted(vm, distinct(q.recorded, q.migrating), marker, log);
  } else if (q.recorded) {
    await vm.adopt(q.recorded);
    await runAdopted(ctx, vm, log);
  } else {
    vm.place = 'stopped';
    log.warn('VM was not running when the sidecar restarted');
  }
  return false;
}

/** The disk journal at restart (src/disk/journal-restart.ts): what it says of the window, and the device QEMU gets. */
async function restartDisk(vm: VmInstance, marker: MigrationMarker | null, completingEpoch: number | null, log: Logger) {
  let journal: BlockJournal | undefined;
  const out: DiskAtRestart = { journal: () => journal, answeredCompleted: null };
  const disk = vm.config.disk;
  if (!disk) return out;
  const jr = await restartJournal({
    journalDir: vm.journalDir,
    vm: vm.name,
    completingEpoch,
    migrationId: marker?.migrationId ?? null,
    journal: { maxBytes: disk.journalMaxBytes, log },
    segmentBytes: disk.journalSegmentBytes,
    openImage: () => FileBlockDevice.open(disk.image),
    log,
  });
  if (jr.kind === 'written-back') out.answeredCompleted = { finalEpoch: jr.finalEpoch, migrationId: jr.migrationId };
  if (jr.kind === 'journal') {
    vm.diskDevice = (image) => {
      journal = jr.device(image);
      return journal;
    };
  }
  return out;
}

/** vm.json's QEMU if it still runs; a hot standby that never got device state is not a VM's QEMU: killed first. */
async function recordedQemu(vm: VmInstance, saved: PersistedVm, log: Logger): Promise<QemuIdentity | null> {
  if (saved.pid !== null && typeof saved.startTime !== 'string') {
    throw new TetherError(
      'ERR_RECOVERY',
      `vm.json (written by an older tether) records QEMU pid ${saved.pid} without its start time: it cannot be told from a reused pid`,
      { pid: saved.pid },
    );
  }
  const id = saved.pid !== null ? { pid: saved.pid, startTime: saved.startTime! } : null;
  return settleStandbys(vm, id && identityAlive(id) ? id : null, log);
}

/** Never `stopped`: a QEMU of this VM may still run, or its only copy may be elsewhere. */
async function leaveUnrecovered(ctx: DaemonContext, vm: VmInstance, e: unknown, log: Logger): Promise<void> {
  const err = e as TetherError;
  const code = err.code ?? 'ERR_RECOVERY';
  await letGo(ctx, vm);
  await vm.markUnrecovered(code, err.message).catch((pe: unknown) => {
    // unrecovered in memory all the same; the next start finds the VM by its records again
    log.warn('the unrecovered cause could not be persisted', { error: errorFields(pe) });
    vm.place = 'unrecovered';
    vm.unrecovered = { code, message: err.message, at: new Date().toISOString() };
  });
  log.error('recovery failed: VM left unrecovered; resolve with `tether vm adopt` or `tether vm forget`', { error: errorFields(e) });
}
