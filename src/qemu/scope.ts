/**
 * QEMU outside the sidecar's cgroup: under systemd, each QEMU runs in a transient scope
 * unit of its own (`systemd-run --scope`), so `systemctl stop|restart tether`, the
 * service's resource limits (TasksMax, MemoryMax, OOM policy) and `systemctl kill tether`
 * never reach a guest. systemd-run creates the scope for its own pid and then execs QEMU:
 * the pid tether records is QEMU's, as without a scope. See docs/deploy.md.
 *
 * Chosen once at daemon start (host config `systemd.scope`):
 *   auto    scopes when systemd is PID 1 and a probe scope starts; otherwise a warning, and
 *           QEMU runs as the sidecar's child in a session of its own (the unit's
 *           KillMode=process then keeps it alive);
 *   always  scopes, or the daemon refuses to start (ERR_QEMU_SCOPE);
 *   never   no scopes.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { promisify } from 'node:util';
import type { HostConfig } from '../config/types.ts';
import { TetherError } from '../errors.ts';
import type { Logger } from '../util/log.ts';

export type ScopeMode = 'auto' | 'always' | 'never';
export const DEFAULT_SCOPE_MODE: ScopeMode = 'auto';
export const DEFAULT_SLICE = 'machine.slice';

/** How to wrap a QEMU command line in a scope. */
export interface ScopeLauncher {
  /** systemd-run, by name (PATH) or path. */
  systemdRun: string;
  slice: string;
}

/** Unit name of a QEMU's scope: tether-<vm>-<8 hex>.scope (vm names are valid unit-name characters). */
export function scopeUnitName(vm: string, suffix: string = randomBytes(4).toString('hex')): string {
  return `tether-${vm}-${suffix}.scope`;
}

/**
 * `systemd-run --scope ... -- <argv>`: the scope holds systemd-run's own pid, which then
 * execs argv[0]. --collect unloads the scope even when QEMU fails; --quiet keeps
 * "Running scope as unit" out of QEMU's log.
 */
export function scopeArgv(l: ScopeLauncher, unit: string, description: string, argv: readonly string[]): string[] {
  return [
    l.systemdRun,
    '--scope',
    '--quiet',
    '--collect',
    `--slice=${l.slice}`,
    `--unit=${unit}`,
    `--description=${description}`,
    '--',
    ...argv,
  ];
}

/** What resolveScope asks of the host (faked in tests). */
export interface ScopeEnv {
  /** sd_booted(): /run/systemd/system exists. */
  systemdIsPid1(): boolean;
  /** Runs argv; resolves with the error text when it fails, null when it exits 0. */
  run(argv: string[]): Promise<string | null>;
}

export const realScopeEnv: ScopeEnv = {
  systemdIsPid1: () => fs.existsSync('/run/systemd/system'),
  async run(argv) {
    try {
      await promisify(execFile)(argv[0]!, argv.slice(1), { timeout: 15_000 });
      return null;
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      return (err.stderr?.trim() || err.message).slice(0, 500);
    }
  },
};

/** Decides how this daemon starts QEMU (see the file comment). Throws ERR_QEMU_SCOPE for `always` without scopes. */
export async function resolveScope(
  cfg: HostConfig['systemd'],
  env: ScopeEnv,
  log: Logger,
  systemdRun = 'systemd-run',
): Promise<ScopeLauncher | null> {
  const mode = cfg?.scope ?? DEFAULT_SCOPE_MODE;
  const launcher: ScopeLauncher = { systemdRun, slice: cfg?.slice ?? DEFAULT_SLICE };
  if (mode === 'never') {
    log.info('qemu scopes off (systemd.scope: never): QEMU runs as a child of the sidecar, in a session of its own');
    return null;
  }
  if (mode === 'auto' && !env.systemdIsPid1()) {
    log.warn(
      'systemd is not PID 1: QEMU runs as a child of the sidecar, in a session of its own; ' +
        "a service manager must not kill the sidecar's whole process group or cgroup (docs/deploy.md)",
      { scope: 'none' },
    );
    return null;
  }
  // A probe scope: the same call a QEMU start makes, with /bin/true.
  const err = await env.run(scopeArgv(launcher, scopeUnitName('probe'), 'tether scope probe', ['true']));
  if (err === null) {
    log.info('each QEMU runs in a transient systemd scope of its own', { slice: launcher.slice });
    return launcher;
  }
  if (mode === 'always') {
    throw new TetherError('ERR_QEMU_SCOPE', `systemd.scope is always, but systemd-run --scope fails: ${err}`, { error: err });
  }
  log.warn('systemd-run --scope fails: QEMU runs as a child of the sidecar, in a session of its own (docs/deploy.md)', {
    scope: 'none',
    error: err,
  });
  return null;
}

let current: ScopeLauncher | null = null;

/** Set by the daemon at start: every QEMU this process starts from now on runs in a scope (or not). */
export function useScope(l: ScopeLauncher | null): void {
  current = l;
}

export function currentScope(): ScopeLauncher | null {
  return current;
}
