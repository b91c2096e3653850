/**
 * The QEMUs a VM's records name. A QEMU is known by the pid and /proc start time recorded
 * when it was spawned (vm.json, the migration marker, standby.json), never by its command
 * line, so a pid reused by another process is never adopted or signalled.
 */
import { TetherError } from '../errors.ts';
import { identityAlive, killIdentity, procStartTime } from '../qemu/process.ts';
import type { QemuIdentity } from '../qemu/process.ts';
import { errorFields } from '../util/log.ts';
import type { Logger } from '../util/log.ts';
import { VmInstance } from '../vm/instance.ts';
import type { MigrationMarker } from '../vm/instance.ts';

/** Bound on each QMP command of a recovery: one VM's silent QEMU must not hold the others. */
export const QMP_RECOVERY_MS = 5000;

export const same = (a: QemuIdentity, b: QemuIdentity): boolean => a.pid === b.pid && a.startTime === b.startTime;

/** The QEMUs given, each once (vm.json's and the marker's are often the same process). */
export function distinct(...qemus: (QemuIdentity | null)[]): QemuIdentity[] {
  return qemus.filter((q, i, a): q is QemuIdentity => q !== null && a.findIndex((o) => o && same(o, q)) === i);
}

/**
 * The live QEMU the migration marker names (pid + start time), or null. A marker of an older
 * build names a pid only: taken as vm.json's QEMU when it is that pid (vm.json has its start
 * time), as gone when no such process exists, and refused (ERR_RECOVERY) otherwise.
 */
export function markerQemu(marker: MigrationMarker | null, recorded: QemuIdentity | null): QemuIdentity | null {
  if (!marker || marker.qemuPid === null) return null;
  const pid = marker.qemuPid;
  let id: QemuIdentity | null;
  if (typeof marker.qemuStartTime === 'string') id = { pid, startTime: marker.qemuStartTime };
  else if (recorded?.pid === pid) id = recorded;
  else if (procStartTime(pid) === null) return null;
  else {
    throw new TetherError('ERR_RECOVERY', `the migration marker names QEMU pid ${pid} without its start time, and pid ${pid} runs`, {
      pid,
    });
  }
  return identityAlive(id) ? id : null;
}

/** SIGKILL a QEMU the records name (never a process that reused its pid) and wait until it is gone. */
export async function killQemu(id: QemuIdentity): Promise<void> {
  if (!(await killIdentity(id))) throw new TetherError('ERR_RECOVERY', `QEMU pid ${id.pid} did not die`);
}

/**
 * Live QEMUs the VM's records name (vm.json, the marker, a standby), by pid + start time, for
 * an operator's adopt or forget. A record that cannot be read names none (logged).
 */
export async function recordedQemus(vm: VmInstance, log: Logger): Promise<QemuIdentity[]> {
  const out: QemuIdentity[] = [];
  const add = (q: QemuIdentity | null | undefined): void => {
    if (q && identityAlive(q) && !out.some((o) => same(o, q))) out.push(q);
  };
  const unreadable = (what: string) => (e: unknown) => {
    log.warn(`${what} cannot be read: the QEMU it may name is not counted`, { error: errorFields(e) });
    return null;
  };
  const saved = await VmInstance.readPersisted(vm.dir).catch(unreadable('vm.json'));
  // a record of an older build (no start time): the operator checked; the pid as it runs now
  const legacy = (pid: number | null | undefined, st: string | null | undefined): QemuIdentity | null => {
    if (pid === null || pid === undefined) return null;
    const startTime = typeof st === 'string' ? st : procStartTime(pid);
    return startTime === null ? null : { pid, startTime };
  };
  add(legacy(saved?.pid, saved?.startTime));
  const marker = await VmInstance.readMarker(vm.dir).catch(unreadable('the migration marker'));
  add(legacy(marker?.qemuPid, marker?.qemuStartTime));
  add(await VmInstance.readStandby(vm.dir));
  return out;
}
