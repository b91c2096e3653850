/**
 * Process and host helpers of the lab: run a command, poll a condition, find QEMU processes,
 * read kernel counters, and sweep what a killed earlier run left behind (namespaces, QEMU,
 * sidecars, RAM files named after a test process that no longer exists).
 */
import type { ChildProcess } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

export function sh(cmd: string, args: string[], opts: { allowFail?: boolean } = {}): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    if (opts.allowFail) return '';
    const err = e as { stderr?: string; message: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${err.stderr ?? err.message}`);
  }
}

/**
 * Poll until `fn` is true. The deadline only keeps a broken run from hanging
 * forever; it is generous on purpose and is not a performance assertion.
 */
export async function waitFor(fn: () => boolean | Promise<boolean>, what: string, timeoutMs = 300_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await fn()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Remove what an earlier run left behind when it was killed too hard to clean
 * up (SIGKILL): namespaces, QEMU processes and RAM files named after a test
 * process that no longer exists.
 */
export function sweepStale(): void {
  const owners = new Set<string>();
  for (const line of sh('ip', ['netns', 'list'], { allowFail: true }).split('\n')) {
    const m = /^(tt(\d+)x\d+)[sdc]\b/.exec(line);
    if (m && !pidAlive(Number(m[2]))) owners.add(m[1]!);
  }
  for (const f of fs.readdirSync('/dev/shm')) {
    const m = /^tether-(tt(\d+)x\d+)$/.exec(f);
    if (m && !pidAlive(Number(m[2]))) owners.add(m[1]!);
  }
  for (const id of owners) {
    sh('pkill', ['-9', '-f', `tether-${id}-.*/[sd]\\.yaml`], { allowFail: true }); // daemons
    sh('pkill', ['-9', '-f', `qemu-system.*tether-${id}[-/]`], { allowFail: true });
    // netclients run in the client namespace (ns "<id>c"); its devices go with it
    for (const pid of sh('ip', ['netns', 'pids', `${id}c`], { allowFail: true })
      .split(/\s+/)
      .filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    for (const suffix of ['s', 'd', 'c']) sh('ip', ['netns', 'del', `${id}${suffix}`], { allowFail: true });
    fs.rmSync(`/dev/shm/tether-${id}`, { recursive: true, force: true });
  }
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export function waitExit(p: ChildProcess, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    p.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

export function fileSize(p: string): number {
  try {
    return fs.statSync(p).size;
  } catch {
    return 0;
  }
}

/** Live QEMU processes whose command line contains `needle` (a RAM file's mem-path=, a socket path). */
export function qemuPidsWith(needle: string): number[] {
  const out: number[] = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const argv = fs.readFileSync(`/proc/${d}/cmdline`, 'latin1').split('\0');
      if (/qemu-system/.test(argv[0] ?? '') && argv.some((a) => a.includes(needle))) out.push(Number(d));
    } catch {
      /* gone meanwhile */
    }
  }
  return out;
}

export function qemuAlive(pid: number | null | undefined): boolean {
  return !!pid && pidAlive(pid);
}

/** Packets the kernel's per-CPU input backlogs dropped (second column of /proc/net/softnet_stat, all CPUs). */
export function softnetDropped(): number {
  return fs
    .readFileSync('/proc/net/softnet_stat', 'utf8')
    .trim()
    .split('\n')
    .reduce((sum, l) => sum + parseInt(l.trim().split(/\s+/)[1] ?? '0', 16), 0);
}
