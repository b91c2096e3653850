import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { TetherError } from '../errors.ts';

/**
 * Field 22 of /proc/<pid>/stat (start time in clock ticks since boot): with the pid it names
 * one process, so a guard never kills a later process that reused the pid.
 */
export function procStartTime(pid: number): string {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
  } catch (e) {
    throw new TetherError('ERR_GUARD', `process ${pid} not found: ${(e as Error).message}`);
  }
  // comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ') '
  const rest = stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
  const st = rest[19];
  if (!st || !/^\d+$/.test(st)) throw new TetherError('ERR_GUARD', `cannot read the start time of process ${pid}`);
  return st;
}

/**
 * The guard, a /bin/sh of a few lines (no Node: it must be small and start fast). It blocks
 * reading its stdin, a pipe whose only writer is the sidecar. Reading "disarm" it exits; at
 * EOF (the sidecar died, however) it SIGKILLs the process if its start time still matches.
 */
export const GUARD_SCRIPT = `read -r line
[ "$line" = disarm ] && exit 0
st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20)
[ -n "$st" ] && [ "$st" = "$2" ] && kill -9 "$1"
exit 0`;

/**
 * Ties a process (the destination's QEMU during the migration window) to this sidecar's
 * life: if the sidecar dies before disarm(), the guard kills that process at once, even if
 * the sidecar never comes back. Runs detached (its own session), so signals aimed at the
 * sidecar's process group do not take it down first. VMs outside a migration have no guard.
 */
export class QemuGuard {
  readonly #child: ChildProcess;
  #disarmed = false;

  private constructor(child: ChildProcess) {
    this.#child = child;
  }

  static arm(pid: number): QemuGuard {
    const st = procStartTime(pid);
    const child = spawn('/bin/sh', ['-c', GUARD_SCRIPT, 'tether-guard', String(pid), st], {
      stdio: ['pipe', 'ignore', 'ignore'],
      detached: true,
    });
    child.unref();
    child.stdin!.on('error', () => {});
    // an unref'd child's pipe must not keep the event loop alive either
    (child.stdin as unknown as { unref?: () => void }).unref?.();
    return new QemuGuard(child);
  }

  get pid(): number | undefined {
    return this.#child.pid;
  }

  /** The window is over (completed, or fenced by this sidecar): the guard exits, killing nothing. */
  disarm(): void {
    if (this.#disarmed) return;
    this.#disarmed = true;
    this.#child.stdin?.end('disarm\n');
  }
}
