/**
 * One QEMU process: spawn, QMP connection, stop/kill, exit bookkeeping.
 *
 * Lifecycle: starting → running → stopping → exited (kill() may jump from any state to
 * exited). The RAM file is NOT ours: it belongs to the caller and outlives every QEMU that
 * maps it — restoring S after a failed migration is "fresh QEMU + same RAM file".
 * The QMP socket IS ours: removed on exit (QEMU removes it itself only on a clean exit).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { VmConfig } from '../config/types.ts';
import { TetherError, isTetherError } from '../errors.ts';
import { QmpClient } from '../qmp/client.ts';
import { buildQemuArgs, type NicRelayPaths, type QemuIncoming } from './cmdline.ts';
import { currentScope, scopeArgv, scopeUnitName, type ScopeLauncher } from './scope.ts';

export interface QemuStartOptions {
  vm: VmConfig;
  ramFile: string;
  qmpSocket: string;
  serialLog: string;
  /** The sidecar's NBD socket for the VM's disk (required when vm.disk is set). */
  nbdSocket?: string;
  incoming?: QemuIncoming;
  /** The TAP of each NIC in vm.nics (QEMU opens it). */
  nicTaps?: readonly string[];
  /** Destination window: each NIC's relay sockets (QEMU listens there). */
  nicRelays?: readonly NicRelayPaths[];
  /** Reserved: running QEMU inside a network namespace is not supported yet. */
  netns?: undefined;
  /** QEMU's stdout+stderr are appended here. Default: qemu-<vm>.log next to serialLog. */
  logFile?: string;
  /** Budget from spawn until QMP is negotiated. Default 15000. */
  startTimeoutMs?: number;
  /**
   * SIGKILL QEMU when this Node process dies in any way, including signals and SIGKILL
   * (via `setpriv --pdeathsig`, util-linux). For tests and harnesses; off by default
   * because a production sidecar restart must not take the guest down.
   */
  dieWithParent?: boolean;
  /**
   * Run QEMU in a transient systemd scope of its own (src/qemu/scope.ts). Default: what
   * the daemon chose at start (currentScope()); null: no scope.
   */
  scope?: ScopeLauncher | null;
  /**
   * Called once QEMU is spawned, before QMP is awaited, with its identity: the caller
   * records it durably (vm.json) so a restarted sidecar finds this QEMU by pid + start
   * time and by nothing else. A rejection kills the new QEMU and fails the start.
   */
  onSpawned?: (id: QemuIdentity) => Promise<void>;
}

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

/** Field 22 (starttime) of /proc/<pid>/stat, or null when there is no such process. */
export function procStartTime(pid: number): string | null {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  } catch {
    return null;
  }
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses; field 3 follows the last ') '
  const f = stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
  return f[19] ?? null; // fields 3.. → index 0 is field 3, so field 22 is index 19
}

/** Whether the process `id` names still runs (same pid AND same start time; a zombie counts as gone). */
export function identityAlive(id: QemuIdentity): boolean {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${id.pid}/stat`, 'latin1');
  } catch {
    return false;
  }
  const f = stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
  return f[19] === id.startTime && f[0] !== 'Z' && f[0] !== 'X';
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
    return true;
  }
  // Until it is reaped (gone from /proc), as callers and tools that probe the pid expect; a
  // zombie whose reaper is slow is dead all the same.
  for (let i = 0; i < 500; i++) {
    if (procStartTime(id.pid) !== id.startTime) return true;
    await sleep(10);
  }
  return !identityAlive(id);
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export type QemuState = 'starting' | 'running' | 'stopping' | 'exited';

/** Bytes of QEMU output kept in memory for error messages. */
const TAIL_BYTES = 8 * 1024;

/** Children started with dieWithParent: SIGKILLed if this Node process exits, so none is orphaned. */
const live = new Set<ChildProcess>();
let exitHookInstalled = false;
function track(child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const c of live) c.kill('SIGKILL');
    });
  }
  live.add(child);
}

export class QemuProcess {
  readonly pid: number;
  /** /proc start time of `pid` (see QemuIdentity); '' when it could not be read (already gone). */
  readonly startTime: string;
  readonly args: readonly string[];
  readonly logFile: string;
  /** Resolves once QEMU has exited and its QMP socket has been removed. Never rejects. */
  readonly exited: Promise<QemuExit>;
  private qmpClient: QmpClient | undefined;
  private stateValue: QemuState = 'starting';
  private exitValue: QemuExit | undefined;
  private tail: Buffer = Buffer.alloc(0);
  private readonly child: ChildProcess;
  private qmpSocket: string;
  /** Identity of the socket file we connected to, so we never unlink a successor's socket. */
  private socketIdentity: { dev: number; ino: number } | undefined;
  private readonly outputDone: Promise<void>;
  /** Resolves when the log file has everything (output drained, exit recorded, flushed). */
  private readonly logFlushed: Promise<void>;

  static async start(opts: QemuStartOptions): Promise<QemuProcess> {
    const { vm, ramFile, qmpSocket, serialLog } = opts;
    const logFile = opts.logFile ?? path.join(path.dirname(serialLog), `qemu-${vm.name}.log`);
    const timeoutMs = opts.startTimeoutMs ?? 15_000;
    const nbd = opts.nbdSocket !== undefined ? { nbdSocket: opts.nbdSocket } : {};
    const nics = { ...(opts.nicTaps ? { nicTaps: opts.nicTaps } : {}), ...(opts.nicRelays ? { nicRelays: opts.nicRelays } : {}) };
    const args = buildQemuArgs(vm, { ramFile, qmpSocket, serialLog, ...nbd, ...nics }, opts.incoming);

    for (const p of [ramFile, qmpSocket, serialLog, logFile]) fs.mkdirSync(path.dirname(p), { recursive: true });
    // A stale socket from a killed predecessor would accept nothing; make sure we only
    // ever connect to the socket of the QEMU we spawn.
    fs.rmSync(qmpSocket, { force: true });
    // Same for the NIC sockets: the sidecar must never connect to a dead QEMU's file.
    for (const r of opts.nicRelays ?? []) for (const s of [r.in, r.out]) fs.rmSync(s, { force: true });

    // systemd-run --scope and setpriv both exec: the pid is QEMU's.
    const scope = opts.scope !== undefined ? opts.scope : currentScope();
    const qemuArgv = [vm.qemu.binary, ...args];
    const scoped = scope ? scopeArgv(scope, scopeUnitName(vm.name), `tether VM ${vm.name} (QEMU)`, qemuArgv) : qemuArgv;
    const argv = opts.dieWithParent ? ['setpriv', '--pdeathsig', 'SIGKILL', '--', ...scoped] : scoped;
    const qp = new QemuProcess(argv, args, qmpSocket, logFile, opts.dieWithParent ?? false);
    if (opts.onSpawned && qp.pid > 0 && qp.startTime !== '') {
      try {
        await opts.onSpawned(qp.identity);
      } catch (e) {
        qp.child.kill('SIGKILL');
        await qp.exited;
        throw e;
      }
    }
    const t0 = Date.now();
    const ac = new AbortController();
    void qp.exited.then(() => ac.abort());
    try {
      qp.qmpClient = await QmpClient.connect(qmpSocket, {
        retryUntilMs: timeoutMs,
        timeoutMs: Math.max(1000, timeoutMs - (Date.now() - t0)),
        signal: ac.signal,
      });
    } catch (e) {
      // QEMU dying mid-handshake surfaces as a QMP error a moment before the exit event.
      await Promise.race([qp.exited, sleep(500)]);
      const died = qp.hasExited;
      if (!died) qp.child.kill('SIGKILL');
      const exit = await qp.exited;
      await Promise.race([qp.logFlushed, sleep(500)]);
      const reason = died ? 'exited' : (e as TetherError).code;
      throw new TetherError(
        'ERR_QEMU_START',
        `QEMU ${vm.name} failed to start (${died ? describeExit(exit) : (e as Error).message})` +
          (qp.stderrTail() ? `: ${qp.stderrTail().trim()}` : ''),
        { vm: vm.name, reason, exit, stderr: qp.stderrTail(), logFile, args },
      );
    }
    try {
      const st = fs.statSync(qmpSocket);
      qp.socketIdentity = { dev: st.dev, ino: st.ino };
    } catch {
      /* raced with exit; cleanup then has nothing to do */
    }
    qp.transition('running');
    return qp;
  }

  /**
   * Take charge of a QEMU that an earlier sidecar started (the sidecar was
   * restarted; the guest must not notice). Its output keeps going to wherever
   * it went; exit is noticed by polling the pid.
   */
  static async adopt(opts: { id: QemuIdentity; qmpSocket: string; logFile: string; timeoutMs?: number }): Promise<QemuProcess> {
    const { pid } = opts.id;
    if (!identityAlive(opts.id)) {
      throw new TetherError('ERR_QEMU_ADOPT', `cannot adopt QEMU pid ${pid}: no such process with that start time`, { pid });
    }
    const qp = new QemuProcess({ adopt: opts.id }, [], opts.qmpSocket, opts.logFile);
    try {
      qp.qmpClient = await QmpClient.connect(opts.qmpSocket, { timeoutMs: opts.timeoutMs ?? 5000 });
    } catch (e) {
      await qp.detach();
      throw new TetherError('ERR_QEMU_ADOPT', `cannot adopt QEMU pid ${pid}: ${(e as Error).message}`, { pid });
    }
    qp.transition('running');
    return qp;
  }

  private constructor(
    argv: string[] | { adopt: QemuIdentity },
    args: string[],
    qmpSocket: string,
    logFile: string,
    killWithParent = false,
  ) {
    this.args = args;
    this.qmpSocket = qmpSocket;
    this.logFile = logFile;
    const log = fs.createWriteStream(logFile, { flags: 'a' });
    log.on('error', () => {}); // a broken log must not take the VM down
    if (Array.isArray(argv)) {
      const [binary, ...spawnArgs] = argv as [string, ...string[]];
      log.write(`=== ${new Date().toISOString()} tether: spawn ${JSON.stringify(argv)}\n`);
      // Its own process group: a Ctrl-C (SIGINT to the terminal's foreground group) or a
      // signal to the sidecar's group stops the sidecar, never the guest.
      this.child = spawn(binary, spawnArgs, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
      this.child.on('error', (err) => {
        this.appendTail(Buffer.from(`spawn ${binary}: ${err.message}\n`));
      });
    } else {
      log.write(`=== ${new Date().toISOString()} tether: adopted running pid ${argv.adopt.pid}\n`);
      this.child = new AdoptedChild(argv.adopt) as unknown as ChildProcess;
    }
    const onOutput = (chunk: Buffer): void => {
      log.write(chunk);
      this.appendTail(chunk);
    };
    this.child.stdout!.on('data', onOutput);
    this.child.stderr!.on('data', onOutput);
    this.outputDone = new Promise((resolve) => this.child.once('close', () => resolve()));
    this.logFlushed = new Promise((resolve) => log.once('close', () => resolve()));
    this.pid = this.child.pid ?? -1;
    this.startTime = Array.isArray(argv) ? (this.pid > 0 ? (procStartTime(this.pid) ?? '') : '') : argv.adopt.startTime;
    if (this.child.pid !== undefined && killWithParent) track(this.child);

    this.exited = new Promise<QemuExit>((resolve) => {
      const finish = async (exit: QemuExit): Promise<void> => {
        if (this.exitValue !== undefined) return;
        this.exitValue = exit;
        live.delete(this.child);
        this.stateValue = 'exited';
        this.removeSocket();
        await this.qmpClient?.close();
        resolve(exit);
        await Promise.race([this.outputDone, sleep(1000)]); // a child (exec:cat) may hold stderr
        log.end(`=== ${new Date().toISOString()} tether: pid ${this.pid} ${describeExit(exit)}\n`);
      };
      this.child.once('exit', (code, signal) => void finish({ code, signal }));
      this.child.once('error', () => {
        // spawn failed (no pid): 'exit' will never come
        if (this.child.pid === undefined) void finish({ code: null, signal: null });
      });
    });
  }

  /** Pid + start time: what vm.json records, and the only way a restarted sidecar finds this QEMU. */
  get identity(): QemuIdentity {
    return { pid: this.pid, startTime: this.startTime };
  }

  /** The QMP connection; valid once start() resolved, closed once QEMU exited. */
  get qmp(): QmpClient {
    return this.qmpClient!;
  }

  get state(): QemuState {
    return this.stateValue;
  }

  /** True once QEMU has exited (and its socket was cleaned up). */
  get hasExited(): boolean {
    return this.exitValue !== undefined;
  }

  /** Exit status once exited, else undefined. */
  get exitStatus(): QemuExit | undefined {
    return this.exitValue;
  }

  /** Last few KiB of QEMU's stdout/stderr. */
  stderrTail(): string {
    return this.tail.toString('utf8');
  }

  /**
   * Polls query-status until QEMU reports `status` (e.g. "running" once an incoming
   * device-state load finished). Polling, not events: the RESUME may precede our connect.
   */
  async waitForStatus(status: string, timeoutMs = 10_000, pollMs = 20): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let last = '';
    for (;;) {
      if (this.exitValue !== undefined) {
        const tail = this.stderrTail().trim();
        throw new TetherError(
          'ERR_QEMU_EXITED',
          `QEMU ${describeExit(this.exitValue)} while waiting for status ${status}${tail ? `: ${tail}` : ''}`,
          {
            want: status,
            exit: this.exitValue,
            stderr: this.stderrTail(),
          },
        );
      }
      try {
        const r = await this.qmp.execute<{ status: string }>('query-status', undefined, {
          timeoutMs: Math.max(100, deadline - Date.now()),
        });
        last = r.status;
        if (last === status) return;
      } catch (e) {
        // QEMU's QMP socket closes a moment before the 'exit' event: give the exit a chance
        // to land so the caller learns "QEMU died", not "QMP closed".
        if (isTetherError(e, 'ERR_QMP_CLOSED')) await Promise.race([this.exited, sleep(1000)]);
        if (this.exitValue === undefined) throw e;
        continue; // reported as ERR_QEMU_EXITED above
      }
      if (Date.now() >= deadline) {
        throw new TetherError('ERR_QEMU_STATUS_TIMEOUT', `QEMU status is ${last}, not ${status}, after ${timeoutMs} ms`, {
          want: status,
          last,
          timeoutMs,
        });
      }
      await sleep(pollMs);
    }
  }

  /** Graceful: QMP quit, SIGKILL after `graceMs`. Resolves with the exit status. */
  async stop(opts: { graceMs?: number } = {}): Promise<QemuExit> {
    if (this.exitValue !== undefined) return this.exitValue;
    const graceMs = opts.graceMs ?? 5000;
    if (this.stateValue === 'running') this.transition('stopping');
    // quit's reply may or may not arrive before the socket closes; either way is fine.
    await this.qmpClient?.execute('quit', undefined, { timeoutMs: graceMs }).catch(() => {});
    const timer = sleep(graceMs, 'timeout' as const);
    if ((await Promise.race([this.exited, timer])) === 'timeout') this.child.kill('SIGKILL');
    return this.exited;
  }

  /**
   * Stop supervising without touching QEMU (sidecar shutdown): the QMP connection is
   * closed and nothing of this process keeps the sidecar alive; QEMU runs on and the
   * next sidecar adopts it. `exited` may then never resolve.
   */
  async detach(): Promise<void> {
    await this.qmpClient?.close();
    if (this.child instanceof AdoptedChild) {
      this.child.stopPolling();
    } else {
      this.child.stdout?.destroy();
      this.child.stderr?.destroy();
      this.child.unref();
    }
  }

  /**
   * Move the QMP socket to `to` (replacing what is there): a hot standby taking over the
   * VM's socket path. The bound socket keeps working under its new name.
   */
  renameSocket(to: string): void {
    fs.renameSync(this.qmpSocket, to);
    this.qmpSocket = to;
  }

  /** SIGKILL now (the wedged source during rollback). Resolves with the exit status. */
  kill(): Promise<QemuExit> {
    if (this.exitValue === undefined) this.child.kill('SIGKILL');
    return this.exited;
  }

  private transition(to: QemuState): void {
    const allowed: Record<QemuState, QemuState[]> = {
      starting: ['running', 'exited'],
      running: ['stopping', 'exited'],
      stopping: ['exited'],
      exited: [],
    };
    if (this.stateValue === 'exited') return; // exit races every other transition and wins
    if (!allowed[this.stateValue].includes(to)) throw new Error(`QemuProcess: illegal transition ${this.stateValue} → ${to}`);
    this.stateValue = to;
  }

  private appendTail(chunk: Buffer): void {
    const joined = Buffer.concat([this.tail, chunk]);
    this.tail = joined.length > TAIL_BYTES ? joined.subarray(joined.length - TAIL_BYTES) : joined;
  }

  private removeSocket(): void {
    try {
      const st = fs.lstatSync(this.qmpSocket);
      // Only our own socket: a successor QEMU may already have created one at this path.
      if (this.socketIdentity === undefined || (st.dev === this.socketIdentity.dev && st.ino === this.socketIdentity.ino)) {
        if (this.socketIdentity !== undefined || st.isSocket()) fs.rmSync(this.qmpSocket, { force: true });
      }
    } catch {
      /* already gone */
    }
  }
}

/** The part of ChildProcess that QemuProcess uses, for a QEMU we did not spawn. */
class AdoptedChild extends EventEmitter {
  readonly pid: number;
  readonly #id: QemuIdentity;
  readonly stdout = new EventEmitter();
  readonly stderr = new EventEmitter();
  readonly #timer: NodeJS.Timeout;
  constructor(id: QemuIdentity) {
    super();
    this.pid = id.pid;
    this.#id = id;
    this.#timer = setInterval(() => {
      // reaped, or the pid now belongs to another process: either way our QEMU exited (as
      // before, a zombie is waited out: whoever probes the pid next must find it gone)
      if (procStartTime(id.pid) !== id.startTime) {
        clearInterval(this.#timer);
        this.emit('exit', null, null);
        this.emit('close');
      }
    }, 100);
  }
  stopPolling(): void {
    clearInterval(this.#timer);
  }
  kill(signal: NodeJS.Signals): boolean {
    if (!identityAlive(this.#id)) return false; // never signal a process that reused the pid
    try {
      process.kill(this.pid, signal);
      return true;
    } catch {
      return false;
    }
  }
}

function describeExit(e: QemuExit): string {
  if (e.signal === null && e.code === null) return 'could not be spawned';
  return e.signal !== null ? `killed by ${e.signal}` : `exited with code ${String(e.code)}`;
}
