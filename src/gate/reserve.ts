/**
 * The smallest bound (gate.maxBytes/maxFrames) a NIC's gate accepts, derived for the
 * relay of the destination's window (src/net/nic.ts, src/net/relay.ts; docs/network.md
 * "Bounds"). The derivation lives here and only here.
 *
 * The relay never stops reading QEMU (QEMU writes its socket in blocking mode from its
 * main loop) and refuses, counted, what would take the gate past its bound: nothing ever
 * arrives "after a pause", so no reserve below the bound is needed for safety (the gate
 * is given a 1-byte/1-frame reserve). What the minimum guarantees instead is that the
 * gate can take, into an empty epoch window, what QEMU hands the relay in one go:
 *
 *  1. the longest record: a GSO frame of up to MAX_RECORD_BYTES (69632, QEMU's
 *     NET_BUFSIZE) with its 12-byte virtio-net header. A bound below it would refuse
 *     such a frame forever (the guest's TCP would retransmit it into the same refusal);
 *  2. what QEMU's end of the relay's out socket holds: on a unix stream socket the
 *     queued bytes are charged to the writer (QEMU) and limited by its sk_sndbuf, not by
 *     the reader's buffers (SO_RCVBUF on the relay's end changes nothing). QEMU 7.2 sets
 *     no SO_SNDBUF on it, so it is net.core.wmem_default (212992 by default) unless the
 *     relay raised it (src/net/nic.ts raises it to the gate's bound). After an event-loop
 *     stall of the sidecar the relay reads all of it at once.
 *
 * Records are `u32 len, u32 vnetLen, header + frame`; QEMU's filter-redirector writes
 * each with three writes (len, vnetLen, payload: net/filter-mirror.c filter_send), and
 * the kernel charges every write at least SKB_TRUESIZE(0), so the socket holds at most
 * sndbuf / (3 * SKB_MIN_TRUESIZE) + 1 records (frames), and at most sndbuf bytes of them.
 * Frame bytes are counted without prefix and header, so the socket's bytes bound them.
 */
import fs from 'node:fs';

/** The virtio-net header of a relay record (virtio_net_hdr_mrg_rxbuf, QEMU's tap with vnet_hdr=on). */
export const VNET_HDR_BYTES = 12;
/** Largest record payload QEMU's reader accepts (NET_BUFSIZE = 4096 + 65536): header + frame. */
export const MAX_RECORD_BYTES = 4096 + 65536;
/** Longest frame the relay passes on: a record's payload less its virtio-net header. */
export const GATE_MAX_FRAME = MAX_RECORD_BYTES - VNET_HDR_BYTES;
/** Writes QEMU's filter-redirector makes per record (len, vnetLen, payload). */
export const WRITES_PER_RECORD = 3;
/**
 * Smallest memory charge of one skb on a unix stream socket (SKB_TRUESIZE(0) on x86-64:
 * 256 for struct sk_buff + 320 for skb_shared_info). Measured: 278 writes of 14- or
 * 60-byte frames fill a 212992-byte send buffer.
 */
export const SKB_MIN_TRUESIZE = 576;
/** Kernel default of net.core.wmem_default (SK_WMEM_MAX on 64-bit), if /proc cannot tell. */
const KERNEL_WMEM_DEFAULT = 212_992;

/** Least working room above the reserve a bound must leave. */
export const GATE_MIN_ROOM = { bytes: 64 * 1024, frames: 64 } as const;

export interface GateReserve {
  bytes: number;
  frames: number;
}

/**
 * Send buffer of QEMU's end of the relay's out socket before the relay raises it: QEMU
 * (chardev socket, io/channel-socket.c) sets no SO_SNDBUF, and the kernel gives an
 * accept()ed socket net.core.wmem_default (sock_init_data): one value for the whole
 * machine (all network namespaces).
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
 * What QEMU can hand the relay at once (see above): its socket's send buffer `sndbuf`
 * full of records, plus the record whose write found the buffer full (it is queued
 * whole before QEMU blocks) — at least one longest record.
 */
export function gateReserve(sndbuf: number = qemuSendBuffer()): GateReserve {
  return {
    bytes: sndbuf + MAX_RECORD_BYTES,
    frames: Math.floor(sndbuf / (WRITES_PER_RECORD * SKB_MIN_TRUESIZE)) + 1,
  };
}

/** Smallest bounds a gate accepts: the reserve plus GATE_MIN_ROOM. */
export function gateMinimum(reserve: GateReserve): GateReserve {
  return { bytes: reserve.bytes + GATE_MIN_ROOM.bytes, frames: reserve.frames + GATE_MIN_ROOM.frames };
}

/**
 * Default bounds: 16 MiB and 32768 frames (or the minimum where that is more). A Linux
 * guest's TCP connection has at most its send buffer in flight (tcp_wmem max 4 MiB by
 * default), so 16 MiB holds four connections at full window for one unacknowledged
 * hold; the frame count covers 16 MiB of 512-byte frames. Held frames are the gate's
 * memory (per NIC), so it is not larger by default.
 */
export function gateDefaults(reserve: GateReserve): { maxBytes: number; maxFrames: number } {
  const min = gateMinimum(reserve);
  return { maxBytes: Math.max(16 * 1024 * 1024, min.bytes), maxFrames: Math.max(32_768, min.frames) };
}
