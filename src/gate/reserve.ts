/**
 * How far below its configured bound a gate must stop reading from QEMU so that what
 * still arrives afterwards fits under the bound (docs/network.md, "Back-pressure").
 *
 * The derivation lives here and only here: the gate pauses at `maxBytes - reserve.bytes`
 * (and `maxFrames - reserve.frames`), and the config loader refuses bounds that leave
 * less than GATE_MIN_ROOM below them.
 */
import fs from 'node:fs';

/**
 * Longest frame the reserve plans for: a 1500-byte MTU Ethernet frame with an 802.1Q tag
 * (14 + 4 + 1500). QEMU 7.2's stream netdev carries no virtio-net header, so the guest
 * gets no segmentation offload and sends nothing longer unless it raises its own MTU
 * (the codec accepts up to 65553 bytes; a longer frame than this one can push the gate
 * over its bound, which is counted and logged, never dropped: see PacketGate).
 */
export const GATE_MAX_FRAME = 1518;
/** Shortest frame the frame count plans for: an Ethernet header alone. */
export const GATE_MIN_FRAME = 14;
/** Bytes of the stream netdev's length prefix before every frame. */
const PREFIX = 4;
/** libuv reads a stream in chunks of 64 KiB (uv__read's suggested size, which Node allocates). */
export const GATE_READ_CHUNK = 64 * 1024;
/** readableHighWaterMark of the NIC's socket (set explicitly in src/net/nic.ts; Node 20's default). */
export const GATE_SOCKET_HWM = 16 * 1024;
/** Frames QEMU's virtio-net moves per TX flush (`x-txburst`, default 256; also the TX ring size). */
export const VIRTIO_NET_TX_BURST = 256;
/**
 * Frames the guest may send per barrier between quiesce() and `stop`: the rest of the TX
 * burst QEMU was blocked in, then whatever the running guest queues until QEMU handles
 * `query-migrate` and `stop`. QEMU bounds only the first part (one burst); the second is
 * the guest's TX rate times two QMP round trips. Measured on a loaded 2-core machine: up
 * to ~615 frames (640 KB of 1042-byte frames) per barrier. The allowance is four bursts.
 */
export const GUEST_TX_PER_BARRIER = 4 * VIRTIO_NET_TX_BURST;
/**
 * Smallest memory charge of one skb on a unix stream socket (SKB_TRUESIZE(0) on x86-64:
 * 256 for struct sk_buff + 320 for skb_shared_info). Every write of QEMU is one skb at
 * least, so the send buffer holds at most sndbuf / 576 + 1 writes, i.e. frames. Measured:
 * 278 writes of 14- or 60-byte frames fill a 212992-byte send buffer.
 */
const SKB_MIN_TRUESIZE = 576;
/** Kernel default of net.core.wmem_default (SK_WMEM_MAX on 64-bit), if /proc cannot tell. */
const KERNEL_WMEM_DEFAULT = 212_992;

/** Least room below the pause threshold a gate must have: reading pauses at or above it. */
export const GATE_MIN_ROOM = { bytes: 64 * 1024, frames: 64 } as const;

export interface GateReserve {
  bytes: number;
  frames: number;
}

/**
 * Send buffer of QEMU's end of the stream netdev socket. QEMU 7.2 (net/stream.c,
 * io/channel-socket.c) sets no SO_SNDBUF on it; the kernel gives a socket created by
 * accept() net.core.wmem_default (sock_init_data), and a unix stream socket's queued
 * bytes are charged to the sender's sk_wmem_alloc and limited by the sender's sk_sndbuf,
 * whatever the reader's buffers are. Our own socket's SO_SNDBUF says nothing about it.
 * net.core.wmem_default is one value for the whole machine (all network namespaces).
 */
export function qemuSendBuffer(): number {
  try {
    const v = Number(fs.readFileSync('/proc/sys/net/core/wmem_default', 'utf8').trim());
    return Number.isSafeInteger(v) && v > 0 ? v : KERNEL_WMEM_DEFAULT;
  } catch {
    return KERNEL_WMEM_DEFAULT;
  }
}

/**
 * What can still reach the gate after it decided to pause, until the ACK that lets the
 * held frames go:
 *
 *  1. The read that crossed the threshold is taken whole (a frame already read is never
 *     dropped): one read chunk, plus the partial frame the decoder carried into it.
 *
 * Then, at every barrier while paused (the barrier must read on from quiesce() to seal():
 * QEMU blocked in its write would never answer `stop`), again:
 *
 *  2. Node's readable buffer: after pause() Node reads on until that buffer holds its
 *     high-water mark: up to HWM - 1 + one chunk. Delivered on resume.
 *  3. QEMU's socket send buffer. QEMU 7.2 writes its end in blocking mode, one writev
 *     (prefix + frame) per frame, from its main loop; the kernel lets it queue while the
 *     charged bytes are below sk_sndbuf, so at most sndbuf bytes plus one write (one
 *     frame) of data, and sndbuf / SKB_MIN_TRUESIZE + 1 frames, wait in the socket.
 *  4. QEMU finishes the virtio-net TX flush it was blocked in (up to VIRTIO_NET_TX_BURST
 *     frames; the guest's TX ring has as many descriptors), and the still running guest
 *     sends on until QEMU handles `stop`: GUEST_TX_PER_BARRIER frames of at most
 *     GATE_MAX_FRAME. This term alone is an allowance from measurement, not a bound
 *     QEMU 7.2 guarantees (docs/network.md, "The reserve").
 *
 * Frames read on at a barrier belong to the epoch it seals, which stays held until its
 * ACK; with a checkpoint window of W the destination runs up to W barriers before the
 * oldest of them is acknowledged, so terms 2-4 count W times. (Measured: 777 KB held
 * with a 64 KiB pause threshold and window 3, more than one barrier's read-on.) The
 * destination's window is the smaller of its own and the source's, so the VM's own
 * `checkpoint.window` bounds it.
 *
 * Frame bytes are counted without their 4-byte prefix, so raw socket bytes bound them.
 */
export function gateReserve(window: number, sndbuf: number = qemuSendBuffer()): GateReserve {
  const perFrame = PREFIX + GATE_MIN_FRAME;
  // 1. the read that crossed the threshold, and the partial frame it completed
  const crossing = { bytes: GATE_READ_CHUNK + GATE_MAX_FRAME, frames: Math.ceil(GATE_READ_CHUNK / perFrame) + 1 };
  const perBarrier: GateReserve[] = [
    // 2. Node's readable buffer, filled after pause()
    { bytes: GATE_SOCKET_HWM + GATE_READ_CHUNK, frames: Math.ceil((GATE_SOCKET_HWM + GATE_READ_CHUNK) / perFrame) },
    // 3. QEMU's socket send buffer
    { bytes: sndbuf + GATE_MAX_FRAME, frames: Math.floor(sndbuf / SKB_MIN_TRUESIZE) + 1 },
    // 4. the rest of the TX burst QEMU was blocked in, and what the guest sends until `stop`
    { bytes: GUEST_TX_PER_BARRIER * GATE_MAX_FRAME, frames: GUEST_TX_PER_BARRIER },
  ];
  const barrier = perBarrier.reduce((a, b) => ({ bytes: a.bytes + b.bytes, frames: a.frames + b.frames }));
  return { bytes: crossing.bytes + window * barrier.bytes, frames: crossing.frames + window * barrier.frames };
}

/** Smallest bounds a gate accepts: the reserve plus GATE_MIN_ROOM. */
export function gateMinimum(reserve: GateReserve): GateReserve {
  return { bytes: reserve.bytes + GATE_MIN_ROOM.bytes, frames: reserve.frames + GATE_MIN_ROOM.frames };
}

/** Default bounds: 16 MiB and 32768 frames, or the minimum where that is more. */
export function gateDefaults(reserve: GateReserve): { maxBytes: number; maxFrames: number } {
  const min = gateMinimum(reserve);
  return { maxBytes: Math.max(16 * 1024 * 1024, min.bytes), maxFrames: Math.max(32_768, min.frames) };
}
