/**
 * The NBD server on a unix socket: the socket adapter around NbdSession. It runs each
 * validated request against the current BlockDevice and writes the simple reply.
 *
 * Requests are executed as they arrive (the client may pipeline; replies carry the
 * handle, order is free). A READ or a WRITE without FUA that the device can complete
 * without blocking (BlockDevice.readNow/writeNow: page-cache hits, journal memory) is
 * answered on the spot, while the socket chunk that carried it is being decoded; the
 * rest run asynchronously. Replies are corked and leave in one writev per event-loop
 * turn, so a burst of pipelined requests costs one read and one write syscall, not one
 * each. In flight per connection is bounded by count and bytes; above
 * either bound, and while the socket's write buffer is full, the server stops reading
 * from the client — backpressure reaches QEMU, nothing is buffered without bound.
 *
 * `setDevice()` swaps what is served (the destination layers the block-write journal
 * over the image): requests already running finish on the device they started on,
 * later ones use the new one. `idle()` waits until no request runs anywhere.
 */
import fs from 'node:fs/promises';
import net from 'node:net';
import type { BlockDevice } from '../disk/block-device.ts';
import { isTetherError, TetherError } from '../errors.ts';
import type { Logger } from '../util/log.ts';
import { errorFields, ignored } from '../util/log.ts';
import * as P from './protocol.ts';
import { NbdSession } from './session.ts';
import type { NbdRequest, NbdSessionEvent } from './session.ts';

export interface NbdServerOptions {
  device: BlockDevice;
  /** The one export's name; clients asking for "" (the default export) get it too. */
  exportName: string;
  log: Logger;
  /** Largest READ/WRITE/WRITE_ZEROES, bytes. Default 32 MiB (the spec's interoperable maximum). */
  maxPayload?: number;
  /** Requests running per connection before the server stops reading. Default 64. */
  maxInFlight?: number;
  /** Request bytes (read lengths + write payloads) running per connection before the server stops reading. Default 64 MiB. */
  maxInFlightBytes?: number;
}

export class NbdServer {
  readonly exportName: string;
  readonly log: Logger;
  readonly maxPayload: number;
  readonly maxInFlight: number;
  readonly maxInFlightBytes: number;
  #device: BlockDevice;
  #server: net.Server | undefined;
  #path: string | undefined;
  readonly #conns = new Set<NbdConnection>();
  #running = 0;
  #idleWaiters: (() => void)[] = [];

  constructor(opts: NbdServerOptions) {
    this.#device = opts.device;
    this.exportName = opts.exportName;
    this.log = opts.log;
    this.maxPayload = opts.maxPayload ?? P.DEFAULT_MAX_PAYLOAD;
    this.maxInFlight = opts.maxInFlight ?? 64;
    this.maxInFlightBytes = opts.maxInFlightBytes ?? 64 * 1024 * 1024;
  }

  get device(): BlockDevice {
    return this.#device;
  }

  /** Path listened on, once listening. */
  get path(): string | undefined {
    return this.#path;
  }

  get connections(): number {
    return this.#conns.size;
  }

  /** Requests running right now, over all connections. */
  get inFlight(): number {
    return this.#running;
  }

  /**
   * Serve `device` from now on; returns the previous one (not closed). The size must not
   * change: clients learned it in the handshake.
   */
  setDevice(device: BlockDevice): BlockDevice {
    if (device.size !== this.#device.size) {
      throw new TetherError('ERR_NBD_DEVICE_SIZE', `new device has ${device.size} bytes, the export has ${this.#device.size}`, {
        from: this.#device.size,
        to: device.size,
      });
    }
    const old = this.#device;
    this.#device = device;
    this.log.info('nbd device swapped', { canTrim: device.canTrim });
    return old;
  }

  /** Resolves when no request is running (immediately if none is). */
  idle(): Promise<void> {
    if (this.#running === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * Listen on a unix socket. A socket file left by an earlier sidecar at the same path is
   * replaced (QEMU's client reconnects to the path, so a restarted sidecar must reuse it).
   */
  async listen(path: string): Promise<void> {
    if (this.#server) throw new TetherError('ERR_NBD_LISTEN', `already listening on ${this.#path}`);
    try {
      const st = await fs.lstat(path);
      if (!st.isSocket()) throw new TetherError('ERR_NBD_LISTEN', `${path} exists and is not a socket`);
      await fs.rm(path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    const server = net.createServer((s) => this.#accept(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) =>
        reject(new TetherError('ERR_NBD_LISTEN', `cannot listen on ${path}: ${e.code ?? e.message}`, { path })),
      );
      server.listen({ path }, () => resolve());
    });
    await fs.chmod(path, 0o600);
    this.#server = server;
    this.#path = path;
    this.log.info('nbd server listening', { path, export: this.exportName, size: this.#device.size });
  }

  /**
   * Stop listening and drop every connection once its running requests have finished
   * (no write is cut in half). The device is not closed: it belongs to the caller.
   * QEMU, with reconnect-delay, retries its I/O on the next server at the same path.
   */
  async close(): Promise<void> {
    const srv = this.#server;
    this.#server = undefined;
    // net.Server.close() calls back only once every connection has ended: stop
    // accepting now, drop the connections below, then wait for it.
    const closed = srv ? new Promise<void>((resolve) => srv.close(() => resolve())) : Promise.resolve();
    for (const c of this.#conns) c.stopReading();
    await this.idle();
    for (const c of this.#conns) c.destroy();
    this.#conns.clear();
    await closed;
    if (this.#path) await fs.rm(this.#path, { force: true });
  }

  #accept(socket: net.Socket): void {
    const conn = new NbdConnection(this, socket);
    this.#conns.add(conn);
    socket.once('close', () => this.#conns.delete(conn));
  }

  /** @internal bookkeeping for idle() */
  started(): void {
    this.#running++;
  }

  /** @internal */
  finished(): void {
    if (--this.#running === 0) {
      const w = this.#idleWaiters;
      this.#idleWaiters = [];
      for (const f of w) f();
    }
  }
}

/**
 * Maps a device failure to the spec's error values (EDQUOT/EFBIG count as ENOSPC): a system
 * error's errno name, from Node's fs (`code`) or from a TetherError's `details.errno`.
 */
export function nbdErrorOf(e: unknown): number {
  const code = isTetherError(e) ? e.details?.errno : (e as { code?: unknown }).code;
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return P.ENOSPC;
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
      return P.EPERM;
    case 'EINVAL':
      return P.EINVAL;
    default:
      return P.EIO;
  }
}

class NbdConnection {
  readonly #server: NbdServer;
  readonly #socket: net.Socket;
  readonly #session: NbdSession;
  readonly #log: Logger;
  #inFlight = 0;
  #inFlightBytes = 0;
  #writeBlocked = false;
  #closing = false;
  #paused = false;
  #corked = false;
  /** Requests decoded from the last chunk beyond the in-flight bound: they start as others finish. */
  readonly #queue: NbdRequest[] = [];

  constructor(server: NbdServer, socket: net.Socket) {
    this.#server = server;
    this.#socket = socket;
    this.#log = server.log.child({ nbdConn: socket.remoteAddress ?? 'unix' });
    const dev = server.device;
    this.#session = new NbdSession({ name: server.exportName, size: dev.size, canTrim: dev.canTrim }, { maxPayload: server.maxPayload });
    socket.on('error', (e) => this.#log.debug('nbd socket error', { error: errorFields(e) }));
    socket.on('drain', () => {
      this.#writeBlocked = false;
      this.#flow();
    });
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('end', () => {
      // Client half-closed: finish what runs, then close our side.
      this.#closing = true;
      this.#maybeEnd();
    });
    this.#send(this.#session.greeting());
  }

  stopReading(): void {
    this.#closing = true;
    this.#queue.length = 0;
    this.#flow();
  }

  destroy(): void {
    this.#socket.destroy();
  }

  #onData(chunk: Buffer): void {
    if (this.#closing) return;
    let events: NbdSessionEvent[];
    try {
      events = this.#session.push(chunk);
    } catch (e) {
      // The session never throws on input; this is a bug, not a client error.
      this.#log.error('nbd session failed', { error: errorFields(e) });
      this.#socket.destroy();
      return;
    }
    for (const ev of events) {
      switch (ev.kind) {
        case 'send':
          this.#send(ev.data);
          break;
        case 'transmission':
          this.#log.debug('nbd transmission', { export: ev.exportName, flags: ev.flags });
          break;
        case 'request':
          if (this.#queue.length === 0 && this.#now(ev.request)) break;
          this.#queue.push(ev.request);
          break;
        case 'close':
          if (ev.soft) {
            this.#closing = true;
            this.#maybeEnd();
          } else {
            this.#log.warn('nbd client dropped', { error: ev.error ? errorFields(ev.error) : undefined });
            this.#closing = true;
            this.#socket.destroy();
          }
          this.#pump();
          return;
      }
    }
    this.#pump();
  }

  /** Start queued requests while under the bound; read more only when the queue is empty. */
  #pump(): void {
    while (this.#queue.length > 0 && this.#inFlight < this.#server.maxInFlight && this.#inFlightBytes < this.#server.maxInFlightBytes) {
      void this.#run(this.#queue.shift()!);
    }
    this.#flow();
  }

  /**
   * The request done synchronously if the device can do it without blocking; false: run
   * it as usual. Only while the replies already buffered stay under the in-flight byte
   * bound, so a chunk of pipelined reads cannot pile up unbounded reply data.
   */
  #now(req: NbdRequest): boolean {
    if (this.#writeBlocked || this.#socket.writableLength >= this.#server.maxInFlightBytes) return false;
    const device = this.#server.device;
    try {
      if (req.command === 'read') {
        const data = device.readNow?.(req.offset, req.length);
        if (!data) return false;
        this.#send(P.encodeSimpleReply(req.handle, 0));
        this.#send(data);
        return true;
      }
      if (req.command === 'write' && !req.fua) {
        if (!device.writeNow?.(req.offset, req.data)) return false;
        this.#send(P.encodeSimpleReply(req.handle, 0));
        return true;
      }
    } catch (e) {
      ignored(this.#log, 'a fast-path request failed: the asynchronous path repeats it and reports its error')(e);
    }
    return false;
  }

  #send(data: Buffer): void {
    if (this.#socket.destroyed) return;
    if (!this.#corked) {
      // Everything sent in this event-loop turn leaves in one writev.
      this.#corked = true;
      this.#socket.cork();
      setImmediate(() => this.#uncork());
    }
    if (!this.#socket.write(data)) {
      this.#writeBlocked = true;
      this.#flow();
    }
  }

  /** setImmediate: after every socket read of this event-loop turn, so their replies leave together. */
  #uncork(): void {
    if (!this.#corked) return;
    this.#corked = false;
    this.#socket.uncork();
  }

  /** Read from the client only while under every bound. */
  #flow(): void {
    const stop =
      this.#closing ||
      this.#writeBlocked ||
      this.#queue.length > 0 ||
      this.#inFlight >= this.#server.maxInFlight ||
      this.#inFlightBytes >= this.#server.maxInFlightBytes;
    if (stop && !this.#paused) {
      this.#paused = true;
      this.#socket.pause();
    } else if (!stop && this.#paused) {
      this.#paused = false;
      this.#socket.resume();
    }
  }

  #maybeEnd(): void {
    if (this.#closing && this.#inFlight === 0 && this.#queue.length === 0 && !this.#socket.destroyed) this.#socket.end();
  }

  async #run(req: NbdRequest): Promise<void> {
    const device = this.#server.device;
    const cost = req.command === 'read' || req.command === 'write' ? req.length : 0;
    this.#inFlight++;
    this.#inFlightBytes += cost;
    this.#server.started();
    let error = 0;
    let data: Buffer | undefined;
    try {
      switch (req.command) {
        case 'read':
          data = await device.read(req.offset, req.length);
          if (data.length !== req.length)
            throw new TetherError('ERR_NBD_SHORT_READ', `device returned ${data.length} of ${req.length} bytes`);
          break;
        case 'write':
          await device.write(req.offset, req.data, { fua: req.fua });
          break;
        case 'flush':
          await device.flush();
          break;
        case 'trim':
          await device.trim(req.offset, req.length);
          if (req.fua) await device.flush();
          break;
        case 'write-zeroes':
          await device.writeZeroes(req.offset, req.length, { fua: req.fua, noHole: req.noHole });
          break;
      }
    } catch (e) {
      error = nbdErrorOf(e);
      data = undefined;
      this.#log.warn('nbd request failed', {
        command: req.command,
        offset: req.offset,
        length: req.length,
        nbdError: error,
        error: errorFields(e),
      });
    }
    this.#inFlight--;
    this.#inFlightBytes -= cost;
    this.#server.finished();
    if (!this.#socket.destroyed) {
      if (data && data.length > 0) {
        this.#send(P.encodeSimpleReply(req.handle, 0));
        this.#send(data);
      } else {
        this.#send(P.encodeSimpleReply(req.handle, error));
      }
    }
    this.#pump();
    this.#maybeEnd();
  }
}
