import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { TetherError } from '../errors.ts';
import { procStat } from '../qemu/identity.ts';

/**
 * Field 22 of /proc/<pid>/stat (start time in clock ticks since boot): with the pid it names
 * one process, so a guard never kills a later process that reused the pid.
 */
export function procStartTime(pid: number): string {
  const stat = procStat(pid);
  if (stat === null) throw new TetherError('ERR_GUARD', `process ${pid} not found`);
  const st = stat.startTime;
  if (!st || !/^\d+$/.test(st)) throw new TetherError('ERR_GUARD', `cannot read the start time of process ${pid}`);
  return st;
}

/**
 * The guard, a /bin/sh of a few lines (no Node: it must be small and start fast). It blocks
 * reading lines from its stdin, a pipe whose only writer is the sidecar: "disarm" makes it
 * exit, "pause" makes it SIGSTOP instead of SIGKILL. At EOF (the sidecar died, however) it
 * signals the process if its start time still matches.
 */
export const GUARD_SCRIPT = `sig=KILL
while read -r line; do
  case "$line" in
    disarm) exit 0 ;;
    pause) sig=STOP ;;
  esac
done
st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20)
[ -n "$st" ] && [ "$st" = "$2" ] && kill -s "$sig" "$1"
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

  /**
   * From now on the sidecar's death freezes the process (SIGSTOP) instead of killing it: the
   * destination in the completion handshake may own the only copy of the VM, which must stop
   * running but must not be destroyed.
   */
  pauseOnly(): void {
    if (!this.#disarmed) this.#child.stdin?.write('pause\n');
  }

  /** The window is over (completed, or fenced by this sidecar): the guard exits, killing nothing. */
  disarm(): void {
    if (this.#disarmed) return;
    this.#disarmed = true;
    this.#child.stdin?.end('disarm\n');
  }
}
