/**
 * One QEMU process: spawn, QMP connection, stop/kill, exit bookkeeping.
 *
 * Lifecycle (a StateMachine, QEMU_TRANSITIONS): starting → running → stopping → exited;
 * exit may come in any state and wins every race. The RAM file is NOT ours: it belongs to the caller and outlives every QEMU that
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
import { ignored, type Logger } from '../util/log.ts';
import { StateMachine } from '../util/state.ts';
import { queryStatus, quit } from './commands.ts';
import { buildQemuArgs, type NicRelayPaths, type QemuIncoming } from './cmdline.ts';
import { identityAlive, procStartTime, type QemuIdentity } from './identity.ts';
import { currentScope, scopeArgv, scopeUnitName, type ScopeLauncher } from './scope.ts';

// The identity helpers live in identity.ts; re-exported here for the callers that import them with QemuProcess.
export { identityAlive, killIdentity, procStartTime, procStat, type QemuIdentity } from './identity.ts';

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
  /** Where the process's lifecycle transitions are logged (none by default). */
  log?: Logger;
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export type QemuState = 'starting' | 'running' | 'stopping' | 'exited';

/** Exit is possible in every state (the process may die any time); nothing follows it. */
const QEMU_TRANSITIONS: Record<QemuState, readonly QemuState[]> = {
  starting: ['running', 'exited'],
  running: ['stopping', 'exited'],
  stopping: ['exited'],
  exited: [],
};

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
  private readonly lifecycle: StateMachine<QemuState>;
  private readonly log: Logger | undefined;
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
    const qp = new QemuProcess(argv, args, qmpSocket, logFile, opts.log, opts.dieWithParent ?? false);
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
        ...(opts.log ? { log: opts.log } : {}),
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
  static async adopt(opts: {
    id: QemuIdentity;
    qmpSocket: string;
    logFile: string;
    timeoutMs?: number;
    log?: Logger;
  }): Promise<QemuProcess> {
    const { pid } = opts.id;
    if (!identityAlive(opts.id)) {
      throw new TetherError('ERR_QEMU_ADOPT', `cannot adopt QEMU pid ${pid}: no such process with that start time`, { pid });
    }
    const qp = new QemuProcess({ adopt: opts.id }, [], opts.qmpSocket, opts.logFile, opts.log);
    try {
      qp.qmpClient = await QmpClient.connect(opts.qmpSocket, { timeoutMs: opts.timeoutMs ?? 5000, ...(opts.log ? { log: opts.log } : {}) });
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
    log: Logger | undefined,
    killWithParent = false,
  ) {
    this.log = log;
    this.lifecycle = new StateMachine<QemuState>('qemu', 'starting', QEMU_TRANSITIONS, log);
    this.args = args;
    this.qmpSocket = qmpSocket;
    this.logFile = logFile;
    const out = fs.createWriteStream(logFile, { flags: 'a' });
    out.on('error', ignored(log, `QEMU output file ${logFile}: a broken log must not take the VM down`));
    if (Array.isArray(argv)) {
      const [binary, ...spawnArgs] = argv as [string, ...string[]];
      out.write(`=== ${new Date().toISOString()} tether: spawn ${JSON.stringify(argv)}\n`);
      // Its own process group: a Ctrl-C (SIGINT to the terminal's foreground group) or a
      // signal to the sidecar's group stops the sidecar, never the guest.
      this.child = spawn(binary, spawnArgs, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
      this.child.on('error', (err) => {
        this.appendTail(Buffer.from(`spawn ${binary}: ${err.message}\n`));
      });
    } else {
      out.write(`=== ${new Date().toISOString()} tether: adopted running pid ${argv.adopt.pid}\n`);
      this.child = new AdoptedChild(argv.adopt) as unknown as ChildProcess;
    }
    const onOutput = (chunk: Buffer): void => {
      out.write(chunk);
      this.appendTail(chunk);
    };
    this.child.stdout!.on('data', onOutput);
    this.child.stderr!.on('data', onOutput);
    this.outputDone = new Promise((resolve) => this.child.once('close', () => resolve()));
    this.logFlushed = new Promise((resolve) => out.once('close', () => resolve()));
    this.pid = this.child.pid ?? -1;
    this.startTime = Array.isArray(argv) ? (this.pid > 0 ? (procStartTime(this.pid) ?? '') : '') : argv.adopt.startTime;
    if (this.child.pid !== undefined && killWithParent) track(this.child);

    this.exited = new Promise<QemuExit>((resolve) => {
      const finish = async (exit: QemuExit): Promise<void> => {
        if (this.exitValue !== undefined) return;
        this.exitValue = exit;
        live.delete(this.child);
        this.lifecycle.to('exited', { pid: this.pid, ...exit });
        this.removeSocket();
        await this.qmpClient?.close();
        resolve(exit);
        await Promise.race([this.outputDone, sleep(1000)]); // a child (exec:cat) may hold stderr
        out.end(`=== ${new Date().toISOString()} tether: pid ${this.pid} ${describeExit(exit)}\n`);
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
    return this.lifecycle.state;
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
        const r = await queryStatus(this.qmp, { timeoutMs: Math.max(100, deadline - Date.now()) });
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
    if (this.lifecycle.is('running')) this.transition('stopping');
    const q = this.qmpClient;
    if (q) await quit(q, { timeoutMs: graceMs }).catch(ignored(this.log, "quit's reply may or may not arrive before the socket closes"));
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
    if (this.lifecycle.is('exited')) return; // exit races every other transition and wins
    this.lifecycle.to(to, { pid: this.pid });
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
