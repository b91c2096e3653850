/**
 * QMP client over a unix socket: the only file in src/qmp/ that touches I/O.
 *
 * Lifecycle (a StateMachine, CLIENT_TRANSITIONS): greeting → negotiating → ready → closed;
 * closed may come in any state. connect() resolves only in 'ready'.
 * Commands carry an id ("t<n>") and are matched by it; a reply that arrives after its
 * command timed out is dropped. Every pending command and event waiter rejects with
 * ERR_QMP_CLOSED when the connection goes away, whatever the reason.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { TetherError } from '../errors.ts';
import type { Logger } from '../util/log.ts';
import { StateMachine } from '../util/state.ts';
import { QmpDecoder, encodeCommand, type QmpEvent, type QmpGreeting, type QmpMessage, type QmpTimestamp } from './codec.ts';

export interface QmpConnectOptions {
  /** Budget for greeting + capability negotiation once the socket is connected. Default 5000. */
  timeoutMs?: number;
  /**
   * Keep retrying ENOENT / ECONNREFUSED for this many ms: QEMU creates the socket a moment
   * after it was spawned. Default 0 (one attempt).
   */
  retryUntilMs?: number;
  /** Delay between connection attempts. Default 20. */
  retryIntervalMs?: number;
  /** Stops retrying (e.g. QEMU exited); connect() then rejects with ERR_QMP_CONNECT. */
  signal?: AbortSignal;
  /** Default per-command timeout for execute(). Default 30000. */
  commandTimeoutMs?: number;
  maxLineBytes?: number;
  /** Where the connection's lifecycle transitions are logged, at debug (none by default). */
  log?: Logger;
}

export interface QmpExecuteOptions {
  timeoutMs?: number;
}

export type QmpClientEvents = {
  event: [name: string, data: Record<string, unknown>, timestamp: QmpTimestamp];
  /** Emitted once. `reason` is set when the connection failed rather than being closed by us. */
  close: [reason: TetherError | undefined];
};

type ClientState = 'greeting' | 'negotiating' | 'ready' | 'closed';

/** A connection may close (either side, or a protocol error) in any state; nothing follows. */
const CLIENT_TRANSITIONS: Record<ClientState, readonly ClientState[]> = {
  greeting: ['negotiating', 'closed'],
  negotiating: ['ready', 'closed'],
  ready: ['closed'],
  closed: [],
};

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: TetherError) => void;
  timer: NodeJS.Timeout;
}

interface EventWaiter {
  name: string;
  predicate: ((data: Record<string, unknown>, ev: QmpEvent) => boolean) | undefined;
  resolve: (ev: QmpEvent) => void;
  reject: (err: unknown) => void;
  timer: NodeJS.Timeout;
}

const RETRYABLE = new Set(['ENOENT', 'ECONNREFUSED', 'EAGAIN']);

export class QmpClient extends EventEmitter<QmpClientEvents> {
  readonly path: string;
  private readonly lifecycle: StateMachine<ClientState>;
  private readonly socket: net.Socket;
  private readonly decoder: QmpDecoder;
  private readonly pending = new Map<string, Pending>();
  private readonly waiters = new Set<EventWaiter>();
  private readonly commandTimeoutMs: number;
  private nextId = 1;
  private greetingValue: QmpGreeting | undefined;
  private onGreeting: ((g: QmpGreeting) => void) | undefined;
  private closeReason: TetherError | undefined;
  private readonly socketClosed: Promise<void>;

  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const socket = await connectWithRetry(path, opts);
    const client = new QmpClient(path, socket, opts);
    try {
      await client.negotiate(opts.timeoutMs ?? 5000);
    } catch (e) {
      await client.close();
      throw e;
    }
    return client;
  }

  private constructor(path: string, socket: net.Socket, opts: QmpConnectOptions) {
    super();
    this.path = path;
    this.lifecycle = new StateMachine<ClientState>(`qmp ${path}`, 'greeting', CLIENT_TRANSITIONS, opts.log, 'debug');
    this.socket = socket;
    this.commandTimeoutMs = opts.commandTimeoutMs ?? 30_000;
    this.decoder = new QmpDecoder(opts.maxLineBytes === undefined ? {} : { maxLineBytes: opts.maxLineBytes });
    this.socketClosed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err: NodeJS.ErrnoException) => {
      this.closeReason ??= new TetherError('ERR_QMP_CLOSED', `QMP socket error: ${err.message}`, {
        path,
        errno: err.code,
      });
    });
    socket.on('close', () => this.shutdown(this.closeReason ?? closedError(path, 'QMP socket closed by peer')));
  }

  /** QEMU's greeting (version, capabilities). */
  get greeting(): QmpGreeting {
    return this.greetingValue!;
  }

  get closed(): boolean {
    return this.state === 'closed';
  }

  /**
   * Runs a QMP command. Resolves with its "return" value; rejects with ERR_QMP_COMMAND
   * (details: command, errorClass, desc), ERR_QMP_TIMEOUT or ERR_QMP_CLOSED.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: QmpExecuteOptions = {}): Promise<T> {
    if (this.state !== 'ready' && !(this.state === 'negotiating' && command === 'qmp_capabilities')) {
      return Promise.reject(closedError(this.path, `QMP connection is ${this.state}`, { command }));
    }
    return this.send<T>(command, args, opts.timeoutMs ?? this.commandTimeoutMs);
  }

  /**
   * Resolves with the next event `name` (for which `predicate`, if given, returns true).
   * Register before running the command that causes the event: QEMU often emits it
   * before the command's reply (e.g. STOP before the return of "stop").
   */
  waitForEvent(
    name: string,
    predicate?: (data: Record<string, unknown>, ev: QmpEvent) => boolean,
    timeoutMs = this.commandTimeoutMs,
  ): Promise<QmpEvent> {
    if (this.state === 'closed') {
      return Promise.reject(closedError(this.path, 'QMP connection is closed', { event: name }));
    }
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        predicate,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiters.delete(waiter);
          reject(new TetherError('ERR_QMP_TIMEOUT', `no QMP event ${name} within ${timeoutMs} ms`, { event: name, timeoutMs }));
        }, timeoutMs),
      };
      this.waiters.add(waiter);
    });
  }

  /** Closes the connection; pending commands and waiters reject with ERR_QMP_CLOSED. Idempotent. */
  async close(): Promise<void> {
    if (this.state !== 'closed') {
      this.shutdown(undefined);
      this.socket.end();
      const t = setTimeout(() => this.socket.destroy(), 1000);
      await this.socketClosed;
      clearTimeout(t);
    } else {
      this.socket.destroy();
      await this.socketClosed;
    }
  }

  private async negotiate(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.off('close', onClose);
        reject(new TetherError('ERR_QMP_TIMEOUT', `no QMP greeting within ${timeoutMs} ms`, { path: this.path, timeoutMs }));
      }, timeoutMs);
      const onClose = (reason: TetherError | undefined): void => {
        clearTimeout(timer);
        reject(reason ?? closedError(this.path, 'QMP connection closed before greeting'));
      };
      this.once('close', onClose);
      this.onGreeting = () => {
        clearTimeout(timer);
        this.off('close', onClose);
        resolve();
      };
    });
    // closed after the greeting, before this continuation ran: report it as what it is
    if (this.state === 'closed') throw this.closeReason ?? closedError(this.path, 'QMP connection closed after the greeting');
    this.lifecycle.to('negotiating');
    await this.send('qmp_capabilities', undefined, Math.max(1, deadline - Date.now()));
    this.lifecycle.to('ready');
  }

  private get state(): ClientState {
    return this.lifecycle.state;
  }

  private send<T>(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<T> {
    const id = `t${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new TetherError('ERR_QMP_TIMEOUT', `QMP command ${command} got no reply within ${timeoutMs} ms`, { command, timeoutMs }));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(encodeCommand(command, args, id));
    });
  }

  private onData(chunk: Buffer): void {
    if (this.state === 'closed') return;
    let messages: QmpMessage[];
    try {
      messages = this.decoder.push(chunk);
    } catch (e) {
      this.closeReason = e as TetherError; // ERR_QMP_MALFORMED or ERR_QMP_LINE_TOO_LONG
      this.socket.destroy();
      return;
    }
    for (const m of messages) {
      this.dispatch(m);
      if ((this.state as ClientState) === 'closed') return;
    }
  }

  private dispatch(m: QmpMessage): void {
    if (this.state === 'greeting') {
      if (m.type !== 'greeting') {
        this.closeReason = new TetherError('ERR_QMP_MALFORMED', `expected QMP greeting, got ${m.type}`, { path: this.path });
        this.socket.destroy();
        return;
      }
      this.greetingValue = m;
      this.onGreeting?.(m);
      return;
    }
    switch (m.type) {
      case 'return':
      case 'error': {
        const p = m.id === undefined ? undefined : this.pending.get(String(m.id));
        if (p === undefined) return; // late reply to a timed-out command, or id-less error
        this.pending.delete(String(m.id));
        clearTimeout(p.timer);
        if (m.type === 'return') p.resolve(m.value);
        else
          p.reject(
            new TetherError('ERR_QMP_COMMAND', `QMP ${p.command} failed: ${m.errorClass}: ${m.desc}`, {
              command: p.command,
              errorClass: m.errorClass,
              desc: m.desc,
            }),
          );
        return;
      }
      case 'event':
        this.emit('event', m.event, m.data, m.timestamp);
        for (const w of [...this.waiters]) {
          if (w.name !== m.event) continue;
          let hit: boolean;
          try {
            hit = w.predicate === undefined || w.predicate(m.data, m);
          } catch (e) {
            this.waiters.delete(w);
            clearTimeout(w.timer);
            w.reject(e);
            continue;
          }
          if (hit) {
            this.waiters.delete(w);
            clearTimeout(w.timer);
            w.resolve(m);
          }
        }
        return;
      case 'greeting':
        return; // a second greeting is meaningless; ignore
    }
  }

  private shutdown(reason: TetherError | undefined): void {
    if (this.state === 'closed') return;
    this.lifecycle.to('closed', reason ? { reason: reason.code } : undefined);
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.reject(
        closedError(this.path, `QMP connection closed while ${p.command} was pending`, {
          command: p.command,
          ...(reason ? { cause: reason.code } : {}),
        }),
      );
    }
    for (const w of this.waiters) {
      clearTimeout(w.timer);
      w.reject(closedError(this.path, `QMP connection closed while waiting for ${w.name}`, { event: w.name }));
    }
    this.waiters.clear();
    this.emit('close', reason);
  }
}

function closedError(path: string, message: string, extra: Record<string, unknown> = {}): TetherError {
  return new TetherError('ERR_QMP_CLOSED', message, { path, ...extra });
}

async function connectWithRetry(path: string, opts: QmpConnectOptions): Promise<net.Socket> {
  const deadline = Date.now() + (opts.retryUntilMs ?? 0);
  const interval = opts.retryIntervalMs ?? 20;
  for (;;) {
    if (opts.signal?.aborted) {
      throw new TetherError('ERR_QMP_CONNECT', `connecting to QMP at ${path} aborted`, { path, aborted: true });
    }
    try {
      return await connectOnce(path);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code ?? '';
      if (!RETRYABLE.has(code) || Date.now() >= deadline) {
        throw new TetherError('ERR_QMP_CONNECT', `cannot connect to QMP at ${path}: ${(e as Error).message}`, {
          path,
          errno: code,
        });
      }
    }
    try {
      await sleep(interval, undefined, opts.signal ? { signal: opts.signal } : undefined);
    } catch {
      /* aborted: reported at the top of the loop */
    }
  }
}

function connectOnce(path: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ path });
    const onError = (err: Error): void => {
      s.destroy();
      reject(err);
    };
    s.once('error', onError);
    s.once('connect', () => {
      s.off('error', onError);
      resolve(s);
    });
  });
}
