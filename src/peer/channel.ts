import { EventEmitter } from 'node:events';
import net from 'node:net';
import { encode, Encoder } from './codec.ts';
import { Decoder } from './decoder.ts';
import type { Message, Role } from './messages.ts';
import { TetherError } from '../errors.ts';
import { Handshake } from './handshake.ts';
import type { DirectionKeys } from './handshake.ts';

export interface ChannelOptions {
  psk: Buffer;
  /** Largest frame payload accepted from the peer. */
  maxPayload?: number;
  handshakeTimeoutMs?: number;
}

const DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024;

/**
 * The authenticated peer channel over TCP (thin: all framing, CRC and MAC
 * checks live in the pure codec, codec.ts and decoder.ts). Emits 'message' for every authenticated
 * message and 'close' once, with the error that ended it, if any.
 * `send` resolves when the socket has taken the bytes without exceeding its
 * high-water mark, so a slow peer slows the sender instead of growing memory.
 */
export class PeerChannel extends EventEmitter<{ message: [Message]; close: [Error | undefined] }> {
  readonly #sock: net.Socket;
  readonly #encoder: Encoder;
  readonly #decoder: Decoder;
  #closed = false;
  bytesSent = 0;
  bytesReceived = 0;

  /** Use PeerChannel.connect or PeerChannel.accept: they run the handshake first. */
  constructor(sock: net.Socket, encoder: Encoder, decoder: Decoder, leftover: Message[]) {
    super();
    this.#sock = sock;
    this.#encoder = encoder;
    this.#decoder = decoder;
    sock.setNoDelay(true);
    sock.on('data', (chunk: Buffer) => {
      this.bytesReceived += chunk.length;
      let msgs: Message[];
      try {
        msgs = this.#decoder.push(chunk);
      } catch (e) {
        this.#fail(e as Error);
        return;
      }
      for (const m of msgs) this.#deliver(m);
    });
    sock.on('error', (e) => this.#fail(e));
    sock.on('close', () => this.#fail(undefined));
    // messages that arrived in the same chunk as the peer's AUTH
    this.#held.push(...leftover);
  }

  #started = false;
  readonly #held: Message[] = [];

  /** Start delivering 'message' events (held until the owner has attached its listeners). */
  start(): void {
    if (this.#started) return;
    this.#started = true;
    for (const m of this.#held.splice(0)) this.emit('message', m);
  }

  #deliver(m: Message): void {
    if (this.#started) this.emit('message', m);
    else this.#held.push(m);
  }

  get remote(): string {
    return `${this.#sock.remoteAddress}:${this.#sock.remotePort}`;
  }

  /** The IP address this channel's socket is connected to (as the kernel reports it). */
  get remoteAddress(): string | undefined {
    return this.#sock.remoteAddress;
  }

  get closed(): boolean {
    return this.#closed;
  }

  static connect(host: string, port: number, opts: ChannelOptions & { connectTimeoutMs?: number }): Promise<PeerChannel> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ host, port });
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new TetherError('ERR_PEER_CONNECT', `no connection to peer ${host}:${port} within ${opts.connectTimeoutMs ?? 5000} ms`));
      }, opts.connectTimeoutMs ?? 5000);
      sock.once('error', (e: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new TetherError('ERR_PEER_CONNECT', `cannot connect to peer ${host}:${port}: ${e.code ?? e.message}`));
      });
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.removeAllListeners('error');
        handshake(sock, 'source', opts).then(resolve, reject);
      });
    });
  }

  static accept(sock: net.Socket, opts: ChannelOptions): Promise<PeerChannel> {
    return handshake(sock, 'destination', opts);
  }

  async send(msg: Message): Promise<void> {
    if (this.#closed) throw new TetherError('ERR_PEER_CLOSED', 'peer channel is closed');
    const bufs = this.#encoder.encode(msg);
    let ok = true;
    for (const b of bufs) {
      this.bytesSent += b.length;
      ok = this.#sock.write(b);
    }
    if (!ok) await this.#drained();
  }

  /**
   * Fault injection only (TETHER_FAULTS): send `msg` with one byte flipped in
   * the middle of its frame, or only the first half of it and then drop the
   * connection, as a broken link or a buggy peer would.
   */
  async sendInjected(msg: Message, mode: 'corrupt' | 'truncate'): Promise<void> {
    const frame = Buffer.concat(this.#encoder.encode(msg));
    if (mode === 'corrupt') {
      frame[frame.length >> 1]! ^= 0x40;
      this.#sock.write(frame);
      return;
    }
    this.#sock.write(frame.subarray(0, frame.length >> 1), () => this.#sock.destroy());
  }

  #drained(): Promise<void> {
    return new Promise((resolve, reject) => {
      const onDrain = () => {
        this.off('close', onClose);
        resolve();
      };
      const onClose = () => {
        this.#sock.off('drain', onDrain);
        reject(new TetherError('ERR_PEER_CLOSED', 'peer channel closed while sending'));
      };
      this.#sock.once('drain', onDrain);
      this.once('close', onClose);
    });
  }

  close(): void {
    this.#sock.destroy();
    this.#fail(undefined);
  }

  #fail(err: Error | undefined): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#sock.destroy();
    this.emit('close', err);
  }
}

/**
 * Runs a Handshake over the socket: HELLO both ways (fresh nonces), then AUTH
 * both ways; each side proves it holds the PSK by a MAC over both nonces under
 * the session key. Until both AUTH frames check out, nothing but HELLO/AUTH is
 * accepted.
 */
function handshake(sock: net.Socket, role: Role, opts: ChannelOptions): Promise<PeerChannel> {
  return new Promise((resolve, reject) => {
    // Until the peer's AUTH checks out, no frame larger than the handshake's own is taken.
    const decoder = new Decoder({ maxPayload: opts.maxPayload ?? DEFAULT_MAX_PAYLOAD, handshake: true });
    let hs: Handshake;
    try {
      hs = new Handshake({ psk: opts.psk, role });
    } catch (e) {
      sock.destroy();
      reject(e);
      return;
    }
    let helloSeen = false;
    const timeoutMs = opts.handshakeTimeoutMs ?? 5000;
    const timer = setTimeout(
      () => fail(new TetherError('ERR_PEER_HANDSHAKE', `peer handshake not done within ${timeoutMs} ms`, { timeout: timeoutMs })),
      timeoutMs,
    );
    const fail = (e: Error) => {
      clearTimeout(timer);
      sock.removeListener('data', onData);
      sock.destroy();
      reject(e);
    };
    const onData = (chunk: Buffer) => {
      let msgs: Message[];
      try {
        msgs = decoder.push(chunk);
      } catch (e) {
        fail(e as Error);
        return;
      }
      while (msgs.length > 0) {
        const m = msgs.shift()!;
        if (!helloSeen) {
          if (m.type !== 'hello' || m.role === role) {
            fail(new TetherError('ERR_PEER_HANDSHAKE', `expected HELLO from the ${hs.peerRole}`));
            return;
          }
          helloSeen = true;
          const { auth, receiveKey } = hs.onHello(m);
          // From here on every frame but AUTH must carry a valid MAC under the peer's
          // direction key (one key per direction: a reflected frame never verifies).
          decoder.setKey(receiveKey);
          if (role === 'destination') for (const b of encode(hs.hello)) sock.write(b);
          for (const b of encode(auth)) sock.write(b);
          continue;
        }
        if (m.type !== 'auth') {
          fail(new TetherError('ERR_PEER_HANDSHAKE', 'expected AUTH'));
          return;
        }
        let keys: DirectionKeys;
        let leftover: Message[];
        try {
          keys = hs.onAuth(m);
        } catch {
          fail(new TetherError('ERR_PEER_AUTH', 'peer failed authentication (wrong key?)'));
          return;
        }
        try {
          // the frames that followed AUTH in the same chunk, parsed (and MAC-checked) only now
          leftover = decoder.authenticated();
        } catch (e) {
          fail(e as Error);
          return;
        }
        clearTimeout(timer);
        sock.removeListener('data', onData);
        resolve(new PeerChannel(sock, new Encoder({ key: keys.send }), decoder, leftover));
        return;
      }
    };
    sock.on('data', onData);
    sock.once('error', (e) => fail(new TetherError('ERR_PEER_HANDSHAKE', `peer socket error during handshake: ${e.message}`)));
    sock.once('close', () => fail(new TetherError('ERR_PEER_HANDSHAKE', 'peer closed during handshake', { closed: true })));
    if (role === 'source') for (const b of encode(hs.hello)) sock.write(b);
  });
}
