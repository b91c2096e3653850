import fs from 'node:fs';
import t from 'tap';
import {
  GATE_MAX_FRAME,
  GATE_MIN_ROOM,
  MAX_RECORD_BYTES,
  VNET_HDR_BYTES,
  gateDefaults,
  gateMinimum,
  gateReserve,
  qemuSendBuffer,
} from './reserve.ts';

t.test('the reserve with the kernel default send buffer', async (t) => {
  const r = gateReserve(212_992);
  // the send buffer's bytes + one longest record (QEMU's NET_BUFSIZE)
  t.equal(r.bytes, 212_992 + 69_632);
  // three writes per record, each charged at least SKB_TRUESIZE(0) = 576
  t.equal(r.frames, Math.floor(212_992 / (3 * 576)) + 1);
  t.equal(r.frames, 124);
  t.same(gateMinimum(r), { bytes: r.bytes + GATE_MIN_ROOM.bytes, frames: r.frames + GATE_MIN_ROOM.frames });
  t.equal(GATE_MAX_FRAME, MAX_RECORD_BYTES - VNET_HDR_BYTES, 'the longest frame is a record less its header');
  t.ok(gateMinimum(gateReserve(0)).bytes >= MAX_RECORD_BYTES, 'even without a send buffer a longest GSO frame fits');
});

t.test('the reserve grows with the send buffer; the host value comes from net.core.wmem_default', async (t) => {
  t.equal(gateReserve(4_194_304).bytes - gateReserve(100_000).bytes, 4_194_304 - 100_000, 'byte for byte');
  t.ok(gateReserve(4_194_304).frames > gateReserve(100_000).frames);
  t.equal(qemuSendBuffer(), Number(fs.readFileSync('/proc/sys/net/core/wmem_default', 'utf8')));
  t.same(gateReserve(), gateReserve(qemuSendBuffer()));
});

t.test('defaults: 16 MiB / 32768 frames, raised to the minimum where that is more', async (t) => {
  t.same(gateDefaults(gateReserve(212_992)), { maxBytes: 16 << 20, maxFrames: 32_768 });
  const big = gateMinimum(gateReserve(64 << 20));
  t.same(gateDefaults(gateReserve(64 << 20)), { maxBytes: big.bytes, maxFrames: big.frames });
});
