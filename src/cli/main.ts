import { parseArgs } from 'node:util';
import { loadHostConfig } from '../config/load.ts';
import { callDaemon } from '../control/client.ts';
import { TetherError } from '../errors.ts';
import { EXIT } from '../migrate/result.ts';
import type { MigrationResult } from '../migrate/result.ts';
import { createLogger } from '../util/log.ts';

const USAGE = `usage:
  tether daemon --config <host.yaml>
  tether check --config <host.yaml> [<vm.yaml>...] [--peer <host:port>]... [--json]
                                      check the host config, every VM config (its vmConfigDir's
                                      and those given) and this host's prerequisites; exit 0 only
                                      if every check passes
  tether vm start <vm.yaml>           start a VM on the local daemon
  tether vm stop <vm>                 stop the VM's QEMU (a daemon restart or SIGTERM never does)
  tether vm adopt <vm>                an unrecovered VM: accept what runs after checking it (the one
                                      QEMU its records name becomes its QEMU, resumed if paused;
                                      none: stopped)
  tether vm forget <vm> [--force]     drop this host's records of a VM that does not run here
                                      (unrecovered, stopped, gone, fenced); touches nothing else;
                                      refused while a QEMU started for it runs, unless --force
  tether migrate <vm> --to <host:port> [--json]
                                      exit 0 completed, 3 rolled back (running on the source),
                                      4 the VM is not running anywhere, 1 error (e.g. no tether
                                      peer reached: nothing was migrated)
  tether status [<vm>] [--json]
  tether abort <vm> [--migration <id>]
                                      roll back (source) or fence (destination) the VM's migration;
                                      with --migration, only if it is that one
options for every client command:
  --config <host.yaml>  find the daemon's control socket in this host config
  --socket <path>       or give the socket directly (default: $TETHER_SOCKET or /run/tether/tether.sock)`;

export async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        socket: { type: 'string' },
        to: { type: 'string' },
        migration: { type: 'string' },
        peer: { type: 'string', multiple: true },
        json: { type: 'boolean', default: false },
        force: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (e) {
    process.stderr.write(`tether: ${(e as Error).message}\n${USAGE}\n`);
    return EXIT.usage;
  }
  const { values: opts, positionals: pos } = parsed;
  if (opts.help || pos.length === 0) {
    process.stdout.write(USAGE + '\n');
    return opts.help ? 0 : EXIT.usage;
  }
  try {
    const [cmd, a1, a2] = pos;
    if (cmd === 'daemon') return await runDaemon(opts.config);
    if (cmd === 'check') return await runCheck(opts.config, pos.slice(1), opts.peer ?? [], opts.json);
    const socket = await socketPath(opts.config, opts.socket);
    switch (cmd) {
      case 'vm':
        if (a1 && a2) {
          const code = await vmCommand(socket, a1, a2, opts);
          if (code !== null) return code;
        }
        break;
      case 'status': {
        const st = await callDaemon(socket, 'status', a1 ? { vm: a1 } : {});
        if (opts.json) return print(st, true);
        const rows = a1 ? [st as VmStatus] : (st as { vms: VmStatus[] }).vms;
        if (rows.length === 0) process.stdout.write('no VMs on this host\n');
        for (const r of rows) process.stdout.write(formatStatus(r) + '\n');
        return 0;
      }
      case 'abort':
        if (a1)
          return print(await callDaemon(socket, 'abort', { vm: a1, ...(opts.migration ? { migration: opts.migration } : {}) }), opts.json);
        break;
      case 'migrate':
        if (a1 && opts.to) return await migrate(socket, a1, opts.to, opts.json);
        break;
    }
    process.stderr.write(`tether: bad command\n${USAGE}\n`);
    return EXIT.usage;
  } catch (e) {
    const err = e as TetherError;
    process.stderr.write(`tether: ${err.code ?? 'ERR_INTERNAL'}: ${err.message}\n`);
    return err.code === 'ERR_USAGE' ? EXIT.usage : 1;
  }
}

/** `tether vm start|stop|adopt|forget <arg>`; null for a subcommand it does not know. */
async function vmCommand(socket: string, sub: string, arg: string, opts: { json: boolean; force: boolean }): Promise<number | null> {
  if (sub === 'start') return print(await callDaemon(socket, 'vm.start', { config: arg }), opts.json);
  if (sub === 'stop') return print(await callDaemon(socket, 'vm.stop', { vm: arg }), opts.json);
  if (sub === 'adopt') {
    const r = (await callDaemon(socket, 'vm.adopt', { vm: arg })) as VmStatus & { adopted: number | null; resumed: boolean };
    if (opts.json) return print(r, true);
    process.stdout.write(
      (r.adopted === null
        ? `${arg}: no QEMU of it runs here; adopted as stopped\n`
        : `${arg}: adopted QEMU pid ${r.adopted}${r.resumed ? ' (it was paused: resumed and announced)' : ''}\n`) +
        formatStatus(r) +
        '\n',
    );
    return 0;
  }
  if (sub === 'forget') {
    const r = (await callDaemon(socket, 'vm.forget', { vm: arg, force: opts.force })) as { leftRunning: number[] };
    if (opts.json) return print(r, true);
    process.stdout.write(
      `${arg}: forgotten on this host (records dropped; RAM file, disk and TAPs untouched)` +
        (r.leftRunning.length ? `; QEMU pid ${r.leftRunning.join(', ')} left running, unsupervised` : '') +
        '\n',
    );
    return 0;
  }
  return null;
}

async function socketPath(config: string | undefined, socket: string | undefined): Promise<string> {
  if (socket) return socket;
  if (config) return (await loadHostConfig(config)).controlSocket;
  return process.env.TETHER_SOCKET ?? '/run/tether/tether.sock';
}

interface VmStatus {
  vm: string;
  host: string;
  state: string;
  pid: number | null;
  memoryMiB: number;
  serialLog: string;
  migration: { role: string; id: string; phase: string; appliedEpoch?: number | null; ackedEpoch?: number } | null;
  lastMigration: { migrationId?: string; outcome?: string; reason?: string; rollback?: { epoch: number | null } } | null;
  unrecovered?: { code: string; message: string } | null;
}

function formatStatus(r: VmStatus): string {
  const parts = [`${r.vm}`, r.state, `on ${r.host}`, r.pid ? `qemu pid ${r.pid}` : 'no qemu', `${r.memoryMiB} MiB`];
  if (r.migration) {
    const applied = r.migration.appliedEpoch ?? null;
    const acked = r.migration.ackedEpoch ?? null;
    const epoch = applied !== null ? `, checkpoint ${applied} applied` : acked !== null ? `, checkpoint ${acked} acknowledged` : '';
    parts.push(`migrating (${r.migration.role}, ${r.migration.phase}${epoch}, migration ${r.migration.id})`);
  }
  if (r.lastMigration?.outcome) {
    const rb = r.lastMigration.rollback;
    parts.push(
      `last migration: ${r.lastMigration.outcome}${r.lastMigration.reason ? ` (${r.lastMigration.reason})` : ''}` +
        (rb ? `, resumed from checkpoint ${rb.epoch ?? 'none'}` : '') +
        (r.lastMigration.migrationId ? ` (migration ${r.lastMigration.migrationId})` : ''),
    );
  }
  if (r.unrecovered) parts.push(`unrecovered: ${r.unrecovered.code}: ${r.unrecovered.message} (tether vm adopt | forget)`);
  parts.push(`serial ${r.serialLog}`);
  return parts.join('  ');
}

function print(v: unknown, json: boolean): number {
  process.stdout.write(json ? JSON.stringify(v) + '\n' : JSON.stringify(v, null, 2) + '\n');
  return 0;
}

async function runDaemon(config: string | undefined): Promise<number> {
  if (!config) throw new TetherError('ERR_USAGE', 'tether daemon needs --config <host.yaml>');
  const host = await loadHostConfig(config);
  const log = createLogger({ host: host.name }, host.logLevel);
  // An error no code owns ends the sidecar at once, guests untouched (src/daemon/crash.ts).
  const { installCrashPolicy } = await import('../daemon/crash.ts');
  installCrashPolicy(log);
  // Imported here: the client commands (status, migrate, ...) need none of the daemon's
  // modules, and loading them through tsx costs every CLI call about 0.3 s of CPU.
  const { Daemon } = await import('../daemon/daemon.ts');
  // QEMU out of the sidecar's cgroup under systemd (docs/deploy.md): decided once, before any QEMU starts.
  const { realScopeEnv, resolveScope, useScope } = await import('../qemu/scope.ts');
  useScope(await resolveScope(host.systemd, realScopeEnv, log));
  const d = new Daemon(host, log);
  await d.start();
  await new Promise<void>((resolve) => {
    // Guests keep running: shutdown only lets go of them (see Daemon.shutdown).
    const stop = (sig: string) => {
      log.info('shutting down; guests keep running', { signal: sig });
      d.shutdown().finally(() => {
        // Nothing should keep the loop alive now; if something does, do not hang a
        // service manager's restart on it.
        setTimeout(() => process.exit(0), 2000).unref();
        resolve();
      });
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
  return 0;
}

/** `tether check`: one line per check (or one JSON object with --json); exit 0 only if none failed. */
async function runCheck(config: string | undefined, vmFiles: string[], peers: string[], json: boolean): Promise<number> {
  if (!config) throw new TetherError('ERR_USAGE', 'tether check needs --config <host.yaml>');
  const { runChecks, formatResult, allPassed } = await import('../check/check.ts');
  const { realCheckEnv } = await import('../check/env.ts');
  const results = await runChecks({ config, vmFiles, peers }, realCheckEnv());
  const passed = allPassed(results);
  if (json) process.stdout.write(JSON.stringify({ ok: passed, checks: results }) + '\n');
  else {
    for (const r of results) process.stdout.write(formatResult(r) + '\n');
    const failed = results.filter((r) => r.status === 'fail').length;
    process.stdout.write(passed ? `all ${results.length} checks passed\n` : `${failed} of ${results.length} checks FAILED\n`);
  }
  return passed ? 0 : 1;
}

const MiB = 1024 * 1024;

async function migrate(socket: string, vm: string, to: string, json: boolean): Promise<number> {
  const out = (s: string) => process.stderr.write(s + '\n');
  let named = false;
  const result = (await callDaemon(socket, 'migrate', { vm, to }, (p) => {
    // the id both hosts' logs name this migration by
    if (!json && !named && typeof p.migrationId === 'string') {
      named = true;
      out(`migration ${p.migrationId}: ${vm} to ${to}`);
    }
    const t = `[${String((Number(p.t) / 1000).toFixed(1)).padStart(6)}s]`;
    const ram = p.ram as { transferred: number; remaining: number; total: number } | undefined;
    const parts = [t, String(p.phase).padEnd(12)];
    if (ram) parts.push(`ram sent ${(ram.transferred / MiB).toFixed(0)} MiB, remaining ${(ram.remaining / MiB).toFixed(0)} MiB`);
    if (p.appliedEpoch !== undefined && p.appliedEpoch !== null) parts.push(`checkpoint ${p.appliedEpoch} applied`);
    if (typeof p.lastPauseMs === 'number') parts.push(`pause ${p.lastPauseMs.toFixed(1)} ms`);
    if (p.reason) parts.push(`reason ${p.reason}`);
    // --json: newline-delimited JSON, progress records first, the result last.
    if (json) process.stdout.write(JSON.stringify({ progress: p }) + '\n');
    else out(parts.join('  '));
  })) as MigrationResult;

  if (json) process.stdout.write(JSON.stringify(result) + '\n');
  else {
    const r = result;
    if (!named) out(`migration ${r.migrationId}: ${vm} to ${to}`);
    if (r.outcome === 'completed') {
      out(`completed: ${vm} runs on ${to} (${(r.totalMs / 1000).toFixed(1)} s, ${r.checkpoints} checkpoints)`);
      if (r.handover && r.handover !== 'confirmed')
        out(`  the destination has not confirmed the hand-over yet (${r.handover}); this host keeps telling it`);
    } else if (r.outcome === 'rolled-back')
      out(
        `rolled back (${r.reason}): ${vm} runs on this host again from checkpoint ${r.rollback?.epoch ?? 'none (before switchover)'}; ` +
          `detected in ${r.rollback?.detectMs} ms, restored in ${r.rollback?.restoreMs} ms`,
      );
    else if (r.outcome === 'continued-on-destination')
      out(
        `ROLLBACK IMPOSSIBLE (${r.reason}): this host could not restore ${vm} (${r.error?.code ?? ''}: ${r.error?.message ?? ''}); ` +
          `it continues on ${to}`,
      );
    else out(`FAILED (${r.reason}): ${vm} is not running anywhere: ${r.error?.message ?? ''}`);
  }
  return r_exit(result);
}

function r_exit(r: MigrationResult): number {
  if (r.outcome === 'continued-on-destination') return EXIT.continuedOnDestination;
  return r.outcome === 'completed' ? EXIT.completed : r.outcome === 'rolled-back' ? EXIT.rolledBack : EXIT.failed;
}
