/**
 * Checkpoint content: the messages that make up one checkpoint transaction on the peer
 * channel (D → S). Their byte layout is in codec.ts; the channel's own messages (HELLO,
 * AUTH, CONTROL, HASHES, ACK, NACK, HEARTBEAT, ABORT) and the frame around every message
 * are in src/peer/messages.ts and src/peer/codec.ts.
 *
 * Checkpoint k is the transaction
 *   BEGIN(k) · PAGES(k)* · (DISK(k) | DISKZERO(k))* · DEVSTATE(k) · COMMIT(k, totals, digest)
 * and is answered by ACK(k) once S has durably applied it (or NACK(k)).
 *
 * COMMIT.digest (wire fact): SHA-256 over, for every PAGES, DISK, DISKZERO and DEVSTATE message of the
 * transaction in the order they were sent,
 *   type u8 ‖ payloadLength u32 BE ‖ payload
 * where payload is exactly the frame payload defined in codec.ts (epoch included). Type and
 * length prefixes make the concatenation unambiguous. BEGIN and COMMIT are not covered:
 * their epoch is checked directly. See `CheckpointDigest` in codec.ts.
 */

export const PAGE_SIZE = 4096;
export const PAGE_SHIFT = 12;

/** Epochs are integers in [0, 2^53); they travel as u64. */
export const MAX_EPOCH = Number.MAX_SAFE_INTEGER;

export interface BeginMessage {
  type: 'begin';
  epoch: number;
}

export interface PagesMessage {
  type: 'pages';
  epoch: number;
  /** Page frame numbers, in the order their data appears. */
  pfns: Uint32Array;
  /** One byte per entry of pfns: 1 = zero page (carries no data), 0 = data follows. */
  zero: Uint8Array;
  /** PAGE_SIZE bytes for every non-zero entry, in pfns order. */
  data: Buffer;
}

export interface DiskMessage {
  type: 'disk';
  epoch: number;
  /** Byte offset in the guest disk image. */
  offset: number;
  data: Buffer;
}

/**
 * A zero extent of the epoch's disk writes (TRIM / WRITE_ZEROES in the journal): the
 * range must read as zeroes once applied. No payload beyond the range: a large discard
 * crosses the link as 24 bytes, not as its length of zeroes.
 */
export interface DiskZeroMessage {
  type: 'diskzero';
  epoch: number;
  /** Byte offset in the guest disk image. */
  offset: number;
  /** Bytes, in [1, MAX_DISK_ZERO_BYTES]. */
  length: number;
}

/** Largest DISKZERO range (a longer zero extent is sent as several). */
export const MAX_DISK_ZERO_BYTES = 1024 * 1024 * 1024;

export interface DevstateMessage {
  type: 'devstate';
  epoch: number;
  data: Buffer;
}

export interface CommitMessage {
  type: 'commit';
  epoch: number;
  /** Number of page entries (zero pages included) over all PAGES messages. */
  pages: number;
  /** Sum of DISK data lengths. */
  diskBytes: number;
  /** DEVSTATE data length. */
  devstateBytes: number;
  /** See the digest definition at the top of this file. */
  digest: Buffer;
}

/** Messages that make up a checkpoint transaction. */
export type CheckpointMessage = BeginMessage | PagesMessage | DiskMessage | DiskZeroMessage | DevstateMessage | CommitMessage;

export type CheckpointMessageType = CheckpointMessage['type'];

/** Messages whose payload is covered by COMMIT.digest. */
export type DigestedMessage = PagesMessage | DiskMessage | DiskZeroMessage | DevstateMessage;

/**
 * Any other frame of the peer channel, known here by its type tag only (the shapes are in
 * src/peer/messages.ts, which checks that the two lists agree): the assembler is fed what
 * the channel yields and refuses these inside a checkpoint.
 */
export interface OtherFrame {
  type: 'hello' | 'auth' | 'control' | 'hashes' | 'ack' | 'nack' | 'heartbeat' | 'abort';
}
