/**
 * The peer handshake (pure: no sockets). Both peers send HELLO(role, nonce); each derives
 *   sessionKey = HMAC-SHA256(psk, "tether/v1 session" ‖ nonceSource ‖ nonceDestination)
 * and sends AUTH(mac = HMAC-SHA256(sessionKey, "tether/v1 auth" ‖ roleByte ‖ nonceS ‖ nonceD));
 * frames after that are MACed with
 *   directionKey(role) = HMAC-SHA256(sessionKey, "tether/v1 frames" ‖ roleByte of the sender).
 * Without the PSK a peer can send HELLO but no AUTH that verifies and no frame whose MAC does.
 * PeerChannel (channel.ts) drives a Handshake over its socket; the frames are the codec's.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { MIN_PSK_SIZE, NONCE_SIZE, ROLE_BYTE } from './codec.ts';
import type { Role } from './messages.ts';
import { TetherError } from '../errors.ts';

interface Nonces {
  source: Buffer;
  destination: Buffer;
}

export interface DirectionKeys {
  /** MACs frames this side sends (Encoder key). */
  send: Buffer;
  /** Verifies frames this side receives (Decoder key). */
  receive: Buffer;
}

export function makeHello(role: Role): { type: 'hello'; role: Role; nonce: Buffer } {
  return { type: 'hello', role, nonce: randomBytes(NONCE_SIZE) };
}

function checkNonce(name: string, n: Buffer): void {
  if (!Buffer.isBuffer(n) || n.length !== NONCE_SIZE) {
    throw new TetherError('ERR_PROTO_HANDSHAKE', `${name} must be ${NONCE_SIZE} bytes`);
  }
}

/** HMAC-based KDF binding the PSK to both connection nonces. */
export function sessionKey(psk: Buffer, nonceSource: Buffer, nonceDestination: Buffer): Buffer {
  if (!Buffer.isBuffer(psk) || psk.length < MIN_PSK_SIZE) {
    throw new TetherError('ERR_PROTO_WEAK_KEY', `pre-shared key must be at least ${MIN_PSK_SIZE} bytes`);
  }
  checkNonce('nonceSource', nonceSource);
  checkNonce('nonceDestination', nonceDestination);
  if (nonceSource.equals(nonceDestination)) {
    throw new TetherError('ERR_PROTO_HANDSHAKE', 'peer echoed our nonce');
  }
  return createHmac('sha256', psk).update('tether/v1 session').update(nonceSource).update(nonceDestination).digest();
}

/** The AUTH mac a peer of `role` sends. */
export function authMac(key: Buffer, role: Role, nonceSource: Buffer, nonceDestination: Buffer): Buffer {
  checkNonce('nonceSource', nonceSource);
  checkNonce('nonceDestination', nonceDestination);
  return createHmac('sha256', key)
    .update('tether/v1 auth')
    .update(Buffer.from([ROLE_BYTE[role]]))
    .update(nonceSource)
    .update(nonceDestination)
    .digest();
}

/** True iff `mac` is the AUTH mac of a peer of `peerRole` (constant-time compare). */
export function verifyAuth(key: Buffer, peerRole: Role, nonceSource: Buffer, nonceDestination: Buffer, mac: Buffer): boolean {
  const expected = authMac(key, peerRole, nonceSource, nonceDestination);
  return Buffer.isBuffer(mac) && mac.length === expected.length && timingSafeEqual(expected, mac);
}

/** Per-direction frame keys for a peer of role `self`. */
export function directionKeys(key: Buffer, self: Role): DirectionKeys {
  const from = (role: Role): Buffer =>
    createHmac('sha256', key)
      .update('tether/v1 frames')
      .update(Buffer.from([ROLE_BYTE[role]]))
      .digest();
  const peer: Role = self === 'source' ? 'destination' : 'source';
  return { send: from(self), receive: from(peer) };
}

/**
 * One side of the handshake as a checked state machine:
 *   await-hello → (onHello) await-auth → (onAuth) done; any error → failed.
 * Usage: send `hello`; on the peer's HELLO call `onHello(msg)`, send the AUTH it returns and
 * install `receiveKey` in the Decoder at once (every frame after the peer's AUTH is MACed,
 * and may arrive in the same chunk); on the peer's AUTH call `onAuth(msg)` and send with the
 * returned keys. Nothing the peer sends is trusted before onAuth returns.
 */
export class Handshake {
  readonly hello: { type: 'hello'; role: Role; nonce: Buffer };
  private state: 'await-hello' | 'await-auth' | 'done' | 'failed' = 'await-hello';
  private key: Buffer | undefined;
  private nonces: Nonces | undefined;

  constructor(private readonly opts: { psk: Buffer; role: Role; nonce?: Buffer }) {
    if (!Buffer.isBuffer(opts.psk) || opts.psk.length < MIN_PSK_SIZE) {
      throw new TetherError('ERR_PROTO_WEAK_KEY', `pre-shared key must be at least ${MIN_PSK_SIZE} bytes`);
    }
    const nonce = opts.nonce ?? randomBytes(NONCE_SIZE);
    checkNonce('nonce', nonce);
    this.hello = { type: 'hello', role: opts.role, nonce };
  }

  get peerRole(): Role {
    return this.opts.role === 'source' ? 'destination' : 'source';
  }

  /** Handles the peer's HELLO; returns the AUTH to send and the key that verifies the peer's frames. */
  onHello(peer: { type: 'hello'; role: Role; nonce: Buffer }): { auth: { type: 'auth'; mac: Buffer }; receiveKey: Buffer } {
    if (this.state !== 'await-hello') throw new TetherError('ERR_PROTO_HANDSHAKE', 'unexpected HELLO');
    this.state = 'failed';
    if (peer.role === this.opts.role) {
      throw new TetherError('ERR_PROTO_HANDSHAKE', `peer claims our own role ${peer.role}`);
    }
    const nonces: Nonces =
      this.opts.role === 'source'
        ? { source: this.hello.nonce, destination: peer.nonce }
        : { source: peer.nonce, destination: this.hello.nonce };
    this.key = sessionKey(this.opts.psk, nonces.source, nonces.destination);
    this.nonces = nonces;
    this.state = 'await-auth';
    return {
      auth: { type: 'auth', mac: authMac(this.key, this.opts.role, nonces.source, nonces.destination) },
      receiveKey: directionKeys(this.key, this.opts.role).receive,
    };
  }

  /** Verifies the peer's AUTH (ERR_PROTO_BAD_AUTH) and returns the frame keys. */
  onAuth(msg: { type: 'auth'; mac: Buffer }): DirectionKeys {
    if (this.state !== 'await-auth') throw new TetherError('ERR_PROTO_HANDSHAKE', 'unexpected AUTH');
    const n = this.nonces!;
    if (!verifyAuth(this.key!, this.peerRole, n.source, n.destination, msg.mac)) {
      this.state = 'failed';
      throw new TetherError('ERR_PROTO_BAD_AUTH', 'peer failed authentication', { peerRole: this.peerRole });
    }
    this.state = 'done';
    return directionKeys(this.key!, this.opts.role);
  }
}
