import t from 'tap';
import { encodeRecords, headerOf, MAX_RECORD_BYTES, RelayDecoder, VNET_HDR_BYTES } from './relay.ts';

const frame = (seq: number, size = 60): Buffer => {
  const f = Buffer.alloc(size, 0x5a);
  f.writeUInt16BE(0x0800, 12);
  f.writeUInt32BE(seq, 14);
  return f;
};
const rec = (payload: Buffer, vlen = VNET_HDR_BYTES): Buffer => {
  const p = Buffer.alloc(8);
  p.writeUInt32BE(payload.length, 0);
  p.writeUInt32BE(vlen, 4);
  return Buffer.concat([p, payload]);
};

t.test('records split anywhere (byte by byte) decode to the same frames, each with its header in front', async (t) => {
  const hdr = Buffer.from([1, 4, 0x36, 0, 0xb4, 0x05, 0x22, 0, 0x10, 0, 0, 0]); // NEEDS_CSUM + TCPv4 GSO
  const big = frame(2, 65000);
  const stream = Buffer.concat([rec(Buffer.concat([hdr, frame(1)])), rec(Buffer.concat([hdr, big]))]);
  const d = new RelayDecoder();
  const out = [];
  for (let i = 0; i < stream.length; i += 7) out.push(...d.push(stream.subarray(i, i + 7)));
  t.equal(out.length, 2);
  t.same(
    out.map((r) => r.kind),
    ['frame', 'frame'],
  );
  const f = out.map((r) => (r.kind === 'frame' ? r.frame : Buffer.alloc(0)));
  t.equal(f[0]!.readUInt32BE(14), 1);
  t.equal(f[1]!.length, 65000, 'a GSO frame up to 64 KiB passes whole');
  t.same(headerOf(f[1]!), hdr, 'the offload header travels with it');
  t.equal(d.buffered, 0);
  // encodeRecords is the inverse: what the relay writes back to QEMU decodes the same
  const again = new RelayDecoder().push(encodeRecords(f));
  t.same(
    again.map((r) => (r.kind === 'frame' ? [headerOf(r.frame), r.frame] : null)),
    f.map((x) => [headerOf(x), x]),
  );
});

t.test("QEMU's headerless RARP is told apart from a guest frame and given a zero header", async (t) => {
  const rarp = Buffer.alloc(60, 0);
  rarp.fill(0xff, 0, 6);
  rarp.writeUInt16BE(0x8035, 12);
  const [a] = new RelayDecoder().push(rec(rarp));
  t.equal(a?.kind, 'announce');
  if (a?.kind === 'announce') {
    t.equal(a.frame.length, 60);
    t.same(headerOf(a.frame), Buffer.alloc(12));
  }
  // the guest's own RARP carries a header: gated like any frame
  const [g] = new RelayDecoder().push(rec(Buffer.concat([Buffer.alloc(12), rarp])));
  t.equal(g?.kind, 'frame');
});

t.test('runt, malformed, and framing errors', async (t) => {
  const d = new RelayDecoder();
  const out = d.push(Buffer.concat([rec(Buffer.alloc(12 + 13)), rec(frame(1), 10), rec(frame(3), 0)]));
  t.same(
    out.map((r) => r.kind),
    ['runt', 'malformed', 'frame'],
    'a frame without header (length 0) gets a zero one',
  );
  const bad = Buffer.alloc(8);
  bad.writeUInt32BE(MAX_RECORD_BYTES + 1, 0);
  t.throws(() => d.push(bad), { code: 'ERR_RELAY_FRAMING' });
  t.throws(() => d.push(rec(frame(1))), { code: 'ERR_RELAY_FRAMING' }, 'dead after lost framing');
  const z = Buffer.alloc(8);
  t.throws(() => new RelayDecoder().push(z), { code: 'ERR_RELAY_FRAMING' }, 'an empty record');
});
