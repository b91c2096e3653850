/**
 * Messages of the peer channel (D ↔ S): the channel's own (handshake, control, hash table,
 * answers, liveness, abort) and the checkpoint content it carries (src/checkpoint/messages.ts).
 * The byte layout of each payload is in codec.ts (and src/checkpoint/codec.ts).
 */
import type { CheckpointMessage, OtherFrame } from '../checkpoint/messages.ts';

export type Role = 'source' | 'destination';

export interface HelloMessage {
  type: 'hello';
  role: Role;
  /** 32 random bytes, fresh per connection. */
  nonce: Buffer;
}

export interface AuthMessage {
  type: 'auth';
  /** authMac(sessionKey, senderRole, nonces): proves the sender holds the PSK. */
  mac: Buffer;
}

export interface ControlMessage {
  type: 'control';
  /** A JSON object (setup and driver messages: control.ts). */
  body: Record<string, unknown>;
}

export interface HashesMessage {
  type: 'hashes';
  startPfn: number;
  /** 8 bytes per page, pages startPfn, startPfn+1, … */
  hashes: Buffer;
}

export interface AckMessage {
  type: 'ack';
  epoch: number;
}

export interface NackMessage {
  type: 'nack';
  epoch: number;
  code: string;
  message: string;
}

export interface HeartbeatMessage {
  type: 'heartbeat';
  epoch: number;
  /** Sender's clock in ms (float64 on the wire); for RTT and lease bookkeeping only. */
  sentAt: number;
}

export interface AbortMessage {
  type: 'abort';
  code: string;
  reason: string;
}

/** The channel's own messages (everything but checkpoint content). */
export type PeerMessage =
  HelloMessage | AuthMessage | ControlMessage | HashesMessage | AckMessage | NackMessage | HeartbeatMessage | AbortMessage;

export type PeerMessageType = PeerMessage['type'];

/** Every message the channel carries. */
export type Message = PeerMessage | CheckpointMessage;

export type MessageType = Message['type'];

// checkpoint/messages.ts knows the peer's messages by type tag only (OtherFrame): the two
// lists must agree, or the assembler would mistake a peer message for checkpoint content.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type Assert<T extends true> = T;
export type PeerTagsAgree = Assert<Same<PeerMessageType, OtherFrame['type']>>;
