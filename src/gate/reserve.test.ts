import fs from 'node:fs';
import t from 'tap';
import { createLogger } from '../util/log.ts';
import { FrameDecoder, encodeFrames } from './codec.ts';
import { PacketGate } from './gate.ts';
import {
  GATE_MAX_FRAME,
  GATE_MIN_FRAME,
  GATE_MIN_ROOM,
  GATE_READ_CHUNK,
  GATE_SOCKET_HWM,
  gateMinimum,
  gateReserve,
  qemuSendBuffer,
  VIRTIO_NET_TX_BURST,
} from './reserve.ts';

t.test('the reserve with the kernel default send buffer', async (t) => {
  const r = gateReserve(212_992);
  // 64 KiB + 1518 | 16 KiB + 64 KiB | 212992 + 1518 | 256 x 1518
  t.equal(r.bytes, 65_536 + 1518 + 16_384 + 65_536 + 212_992 + 1518 + 256 * 1518);
  t.equal(r.bytes, 752_092);
  // 65536/18 + 1 | 81920/18 | 212992/576 + 1 | 256
  t.equal(r.frames, 3641 + 1 + 4552 + 369 + 1 + 256);
  t.same(gateMinimum(r), { bytes: r.bytes + GATE_MIN_ROOM.bytes, frames: r.frames + GATE_MIN_ROOM.frames });
});

t.test('the reserve grows with the send buffer; the host value comes from net.core.wmem_default', async (t) => {
  const a = gateReserve(100_000);
  const b = gateReserve(4_194_304);
  t.equal(b.bytes - a.bytes, 4_194_304 - 100_000, 'byte for byte');
  t.ok(b.frames > a.frames);
  t.equal(qemuSendBuffer(), Number(fs.readFileSync('/proc/sys/net/core/wmem_default', 'utf8')));
  t.same(gateReserve(), gateReserve(qemuSendBuffer()));
});

/**
 * The derivation played through the production decoder and gate: a gate at the minimum
 * bound is filled to just below its pause threshold; then the worst case of every term
 * arrives, as stream bytes split the way Node reads them: the chunk that crosses the
 * threshold (carrying a partial frame), Node's readable buffer, QEMU's send buffer and
 * the rest of a TX burst read on during a barrier. Held never exceeds the bound.
 */
t.test('worst case of every reserve term stays within the minimum bound', async (t) => {
  const sndbuf = 212_992;
  for (const size of [GATE_MAX_FRAME, GATE_MIN_FRAME, 60, 1000]) {
    const reserve = gateReserve(sndbuf);
    const min = gateMinimum(reserve);
    const over = { bytes: 0, frames: 0 };
    const pauses: boolean[] = [];
    const gate = new PacketGate({
      name: 'vm/net0',
      mode: 'gated',
      maxBytes: min.bytes,
      maxFrames: min.frames,
      reserve,
      log: createLogger({}, 'error', () => {}),
      sinks: { toWire: () => {}, pauseGuest: (p) => pauses.push(p) },
      counters: {
        held: () => {},
        passed: () => {},
        released: () => {},
        discarded: () => {},
        backpressure: () => {},
        overBound: (b, f) => {
          over.bytes += b;
          over.frames += f;
        },
      },
    });
    const dec = new FrameDecoder();
    const feed = (raw: Buffer) => {
      for (let o = 0; o < raw.length; o += GATE_READ_CHUNK) gate.fromGuest(dec.push(raw.subarray(o, o + GATE_READ_CHUNK)));
    };
    const frames = (bytes: number, len = size) =>
      encodeFrames(Array.from({ length: Math.max(1, Math.floor(bytes / (4 + len))) }, () => Buffer.alloc(len, 7)));
    // room: the working room minus one frame, whole frames only
    const room = Math.min(GATE_MIN_ROOM.bytes - size, (GATE_MIN_ROOM.frames - 1) * size);
    feed(frames(room * ((4 + size) / size)));
    t.same(pauses, [], `${size}: below the threshold`);
    // 1: a partial max frame, then one full chunk that completes it and crosses
    const partial = encodeFrames([Buffer.alloc(GATE_MAX_FRAME, 1)]);
    gate.fromGuest(dec.push(partial.subarray(0, partial.length - 1)));
    const chunk = Buffer.concat([partial.subarray(partial.length - 1), frames(GATE_READ_CHUNK - 1)]).subarray(0, GATE_READ_CHUNK);
    gate.fromGuest(dec.push(chunk));
    t.same(pauses, [true], `${size}: paused`);
    // 2-4: the barrier reads on: Node's buffer, QEMU's socket, the rest of the burst
    gate.quiesce();
    feed(frames(GATE_SOCKET_HWM - 1 + GATE_READ_CHUNK));
    // the kernel charges every write (one frame) at least SKB_TRUESIZE(0) = 576 bytes
    const inSocket = Math.min(Math.floor(sndbuf / (4 + size)) + 1, Math.floor(sndbuf / 576) + 1);
    feed(encodeFrames(Array.from({ length: inSocket }, () => Buffer.alloc(size, 3))));
    feed(encodeFrames(Array.from({ length: VIRTIO_NET_TX_BURST }, () => Buffer.alloc(GATE_MAX_FRAME, 2))));
    t.ok(gate.heldBytes <= min.bytes, `${size}: held ${gate.heldBytes} <= bound ${min.bytes}`);
    t.ok(gate.heldFrames <= min.frames, `${size}: held ${gate.heldFrames} frames <= bound ${min.frames}`);
    t.same(over, { bytes: 0, frames: 0 }, `${size}: never over the bound`);
    await gate.seal(1);
  }
});
