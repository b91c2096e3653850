import fs from 'node:fs';
import t from 'tap';
import { FrameDecoder, encodeFrames } from './codec.ts';
import { rig } from './gate-rig.ts';
import {
  GATE_MAX_FRAME,
  GATE_MIN_FRAME,
  GATE_MIN_ROOM,
  GATE_READ_CHUNK,
  GATE_SOCKET_HWM,
  gateDefaults,
  gateMinimum,
  gateReserve,
  qemuSendBuffer,
  GUEST_TX_PER_BARRIER,
} from './reserve.ts';

t.test('the reserve with the kernel default send buffer', async (t) => {
  const r = gateReserve(1, 212_992);
  // 64 KiB + 1518 | 16 KiB + 64 KiB | 212992 + 1518 | 1024 x 1518
  t.equal(r.bytes, 65_536 + 1518 + 16_384 + 65_536 + 212_992 + 1518 + 1024 * 1518);
  t.equal(r.bytes, 1_917_916);
  // 65536/18 + 1 | 81920/18 | 212992/576 + 1 | 1024
  t.equal(r.frames, 3641 + 1 + 4552 + 369 + 1 + 1024);
  t.same(gateMinimum(r), { bytes: r.bytes + GATE_MIN_ROOM.bytes, frames: r.frames + GATE_MIN_ROOM.frames });
  // every barrier in the window reads on once more: terms 2-4 again
  const w3 = gateReserve(3, 212_992);
  t.equal(w3.bytes, 65_536 + 1518 + 3 * (16_384 + 65_536 + 212_992 + 1518 + 1024 * 1518));
  t.equal(w3.bytes, 5_619_640);
  t.equal(w3.frames, 3642 + 3 * (4552 + 370 + 1024));
  t.same(gateMinimum(w3), { bytes: 5_685_176, frames: 21_544 });
});

t.test('the reserve grows with the send buffer; the host value comes from net.core.wmem_default', async (t) => {
  const a = gateReserve(1, 100_000);
  const b = gateReserve(1, 4_194_304);
  t.equal(b.bytes - a.bytes, 4_194_304 - 100_000, 'byte for byte');
  t.ok(b.frames > a.frames);
  t.equal(gateReserve(2, 4_194_304).bytes - gateReserve(2, 100_000).bytes, 2 * (4_194_304 - 100_000), 'per barrier');
  t.equal(qemuSendBuffer(), Number(fs.readFileSync('/proc/sys/net/core/wmem_default', 'utf8')));
  t.same(gateReserve(3), gateReserve(3, qemuSendBuffer()));
});

t.test('defaults: 16 MiB / 32768 frames, raised to the minimum where that is more', async (t) => {
  t.same(gateDefaults(gateReserve(3, 212_992)), { maxBytes: 16 << 20, maxFrames: 32_768 });
  const big = gateMinimum(gateReserve(16, 4 << 20));
  t.same(gateDefaults(gateReserve(16, 4 << 20)), { maxBytes: big.bytes, maxFrames: big.frames });
});

/**
 * The derivation played through the production decoder and gate: a gate at the minimum
 * bound is filled to just below its pause threshold; then the worst case of every term
 * arrives, as stream bytes split the way Node reads them: the chunk that crosses the
 * threshold (carrying a partial frame), then, at each of `window` barriers without an
 * ACK, Node's readable buffer, QEMU's send buffer and the rest of a TX burst, read on
 * between quiesce() and seal(). Held never exceeds the bound.
 */
t.test('worst case of every reserve term stays within the minimum bound', async (t) => {
  const sndbuf = 212_992;
  for (const [size, window] of [
    [GATE_MAX_FRAME, 1],
    [GATE_MAX_FRAME, 3],
    [GATE_MIN_FRAME, 3],
    [60, 2],
    [1000, 3],
  ] as const) {
    const reserve = gateReserve(window, sndbuf);
    const min = gateMinimum(reserve);
    const { gate, pauses, over } = rig('gated', min.bytes, min.frames, reserve);
    const dec = new FrameDecoder();
    const feed = (raw: Buffer) => {
      for (let o = 0; o < raw.length; o += GATE_READ_CHUNK) gate.fromGuest(dec.push(raw.subarray(o, o + GATE_READ_CHUNK)));
    };
    const frames = (bytes: number, len = size) =>
      encodeFrames(Array.from({ length: Math.max(1, Math.floor(bytes / (4 + len))) }, () => Buffer.alloc(len, 7)));
    // room: the working room minus one frame, whole frames only
    const room = Math.min(GATE_MIN_ROOM.bytes - size, (GATE_MIN_ROOM.frames - 1) * size);
    feed(frames(room * ((4 + size) / size)));
    t.same(pauses, [], `${size}/${window}: below the threshold`);
    // 1: a partial max frame, then one full chunk that completes it and crosses
    const partial = encodeFrames([Buffer.alloc(GATE_MAX_FRAME, 1)]);
    gate.fromGuest(dec.push(partial.subarray(0, partial.length - 1)));
    const chunk = Buffer.concat([partial.subarray(partial.length - 1), frames(GATE_READ_CHUNK - 1)]).subarray(0, GATE_READ_CHUNK);
    gate.fromGuest(dec.push(chunk));
    t.same(pauses, [true], `${size}/${window}: paused`);
    // 2-4 at every barrier of the window: Node's buffer, QEMU's socket, the rest of the burst
    for (let epoch = 1; epoch <= window; epoch++) {
      gate.quiesce();
      feed(frames(GATE_SOCKET_HWM - 1 + GATE_READ_CHUNK));
      // the kernel charges every write (one frame) at least SKB_TRUESIZE(0) = 576 bytes
      const inSocket = Math.min(Math.floor(sndbuf / (4 + size)) + 1, Math.floor(sndbuf / 576) + 1);
      feed(encodeFrames(Array.from({ length: inSocket }, () => Buffer.alloc(size, 3))));
      feed(encodeFrames(Array.from({ length: GUEST_TX_PER_BARRIER }, () => Buffer.alloc(GATE_MAX_FRAME, 2))));
      await gate.seal(epoch);
      t.same(pauses.at(-1), true, `${size}/${window}: paused again after seal(${epoch})`);
    }
    t.ok(gate.heldBytes <= min.bytes, `${size}/${window}: held ${gate.heldBytes} <= bound ${min.bytes}`);
    t.ok(gate.heldFrames <= min.frames, `${size}/${window}: held ${gate.heldFrames} frames <= bound ${min.frames}`);
    t.same(over, { bytes: 0, frames: 0, calls: 0 }, `${size}/${window}: never over the bound`);
  }
});
