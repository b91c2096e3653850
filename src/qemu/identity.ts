/**
 * Which process is a VM's QEMU: pid + /proc start time (QemuIdentity), never a pid alone. What
 * vm.json, the migration marker and a standby record name, and how a restarted sidecar finds,
 * checks and kills the QEMUs an earlier one started.
 */
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * What identifies a QEMU this sidecar started: its pid plus the process's start time
 * (field 22 of /proc/<pid>/stat, clock ticks since boot). A pid alone may be reused by
 * any process after QEMU died; a command line can be forged by any local user. Neither
 * is ever taken for "this VM's QEMU".
 */
export interface QemuIdentity {
  pid: number;
  startTime: string;
}

/**
 * State (field 3) and start time (field 22) of /proc/<pid>/stat, or null when there is no
 * such process (or `/proc/<pid>/stat` cannot be read). The one parser of that file.
 */
export function procStat(pid: number): { state: string; startTime: string | null } | null {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  } catch {
    return null; // no such process
  }
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses; field 3 follows the last ') '
  const f = stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
  return { state: f[0] ?? '', startTime: f[19] ?? null }; // fields 3.. → index 0 is field 3, so field 22 is index 19
}

/** Field 22 (starttime) of /proc/<pid>/stat, or null when there is no such process. */
export function procStartTime(pid: number): string | null {
  return procStat(pid)?.startTime ?? null;
}

/** Whether the process `id` names still runs (same pid AND same start time; a zombie counts as gone). */
export function identityAlive(id: QemuIdentity): boolean {
  const st = procStat(id.pid);
  return st !== null && st.startTime === id.startTime && st.state !== 'Z' && st.state !== 'X';
}

/**
 * SIGKILL the process `id` names and wait until it is gone; a pid now held by another
 * process (start time differs) is never signalled. Resolves false if it did not die in ~5 s.
 * (Between the check and the signal the pid cannot be reused unless the process exited and
 * was reaped in that instant, and all pids wrapped around since: not a practical race.)
 */
export async function killIdentity(id: QemuIdentity): Promise<boolean> {
  if (!identityAlive(id)) return true;
  try {
    process.kill(id.pid, 'SIGKILL');
  } catch {
    return true; // ESRCH: gone between the check and the signal
  }
  // Until it is reaped (gone from /proc), as callers and tools that probe the pid expect; a
  // zombie whose reaper is slow is dead all the same.
  for (let i = 0; i < 500; i++) {
    if (procStartTime(id.pid) !== id.startTime) return true;
    await sleep(10);
  }
  return !identityAlive(id);
}
