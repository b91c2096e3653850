/**
 * A guest cannot crash the sidecar with the frames it sends, and the relay never stops
 * reading QEMU. The production NicPort with its relay, against a stand-in for QEMU's two
 * filter-redirector sockets (unix servers: the test writes records to `out` as r0 does and
 * reads what the relay writes to `in` as r1 does).
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { nullLogger } from '../util/log.ts';
import { sleep } from '../util/time.ts';
import { NicPort, type NicCounters } from './nic.ts';
import { RelayDecoder, VNET_HDR_BYTES } from './relay.ts';

const waitUntil = async (fn: () => boolean, what: string): Promise<void> => {
  const deadline = Date.now() + 10_000;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`waited 10 s in vain for ${what}`);
    await sleep(2);
  }
};

/** A broadcast frame of a local experimental ethertype carrying `seq`. */
const frame = (seq: number, size = 60): Buffer => {
  const f = Buffer.alloc(size, 0x5a);
  f.fill(0xff, 0, 6);
  Buffer.from([0x52, 0x54, 0x00, 0xbe, 0x00, 0x01]).copy(f, 6);
  f.writeUInt16BE(0x88b5, 12);
  f.writeUInt32BE(seq, 14);
  return f;
};

/** One record as QEMU's r0 writes it: len, vnet header length, header + frame. */
const record = (payload: Buffer, vlen = VNET_HDR_BYTES, hdr: Buffer | null = Buffer.alloc(VNET_HDR_BYTES, 0)): Buffer => {
  const body = hdr ? Buffer.concat([hdr, payload]) : payload;
  const p = Buffer.alloc(8);
  p.writeUInt32BE(body.length, 0);
  p.writeUInt32BE(vlen, 4);
  return Buffer.concat([p, body]);
};

async function rig(t: import('tap').Test, mode: 'pass' | 'gated', bounds = { maxBytes: 64 * 1024 * 1024, maxFrames: 1 << 20 }) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-relay-'));
  const relay = { in: path.join(dir, 'rin0.sock'), out: path.join(dir, 'rout0.sock') };
  let out: net.Socket | undefined;
  let outConns = 0;
  const all: net.Socket[] = [];
  // what the relay wrote to `in`: decoded as QEMU's r1 would, headers kept
  const seen: { seq: number; hdr: Buffer; len: number }[] = [];
  const dec = new RelayDecoder();
  const outSrv = net.createServer((s) => {
    s.on('error', () => {});
    out = s;
    outConns++;
    all.push(s);
  });
  let inConn: net.Socket | undefined;
  const inSrv = net.createServer((s) => {
    s.on('error', () => {});
    all.push(s);
    inConn = s;
    s.on('data', (c) => {
      for (const r of dec.push(c)) {
        if (r.kind !== 'frame' && r.kind !== 'announce') continue;
        const f = r.frame;
        const hdr = Buffer.from(f.buffer, f.byteOffset - VNET_HDR_BYTES, VNET_HDR_BYTES);
        seen.push({ seq: f.readUInt16BE(12) === 0x88b5 ? f.readUInt32BE(14) : -1, hdr: Buffer.from(hdr), len: f.length });
      }
    });
  });
  await new Promise<void>((r) => outSrv.listen(relay.out, r));
  await new Promise<void>((r) => inSrv.listen(relay.in, r));
  t.teardown(async () => {
    for (const s of all) s.destroy();
    await new Promise<void>((r) => outSrv.close(() => r()));
    await new Promise<void>((r) => inSrv.close(() => r()));
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const dropped: Record<string, number> = {};
  const noop = () => {};
  const counters: NicCounters = {
    held: noop,
    passed: noop,
    released: noop,
    discarded: noop,
    backpressure: noop,
    overBound: noop,
    dropped: (reason, n) => (dropped[reason] = (dropped[reason] ?? 0) + n),
  };
  const port = new NicPort({
    vm: 'vm1',
    index: 0,
    nic: { mac: '52:54:00:be:00:01', bridge: 'brt', tap: 'tnic' },
    mode,
    relay,
    bounds,
    checkpointWindow: 3,
    log: nullLogger,
    counters,
  });
  t.teardown(() => port.close(false));
  await port.open();
  await port.waitConnected(10_000);
  await waitUntil(() => out !== undefined, 'the connection');
  return {
    port,
    send: (recs: Buffer[]) => out!.write(Buffer.concat(recs)),
    outConns: () => outConns,
    closeOut: () => out!.end(),
    /** QEMU's r1 stops / resumes reading the in socket (a busy main loop). */
    pauseIn: () => inConn!.pause(),
    resumeIn: () => inConn!.resume(),
    seen,
    seqs: () => seen.map((s) => s.seq),
    dropped,
  };
}

t.test(
  'runt and malformed records from the guest are counted and dropped; the good ones pass with their header, the sidecar lives',
  async (t) => {
    const r = await rig(t, 'pass');
    const runts = Array.from({ length: 13 }, (_, i) => record(Buffer.alloc(i + 1, 0xee)));
    const hdr = Buffer.from([1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0]); // NEEDS_CSUM, csum_start 34, csum_offset 16
    r.send([record(frame(1), 12, hdr), ...runts, record(frame(2))]);
    await waitUntil(() => r.seqs().includes(2), 'frame 2 at QEMU');
    r.send([runts[0]!]); // a runt alone in its chunk
    r.send([record(frame(3), 4)]); // a header length QEMU never uses
    r.send([record(frame(4))]);
    await waitUntil(() => r.seqs().includes(4), 'frame 4 at QEMU');
    t.same(r.seqs(), [1, 2, 4], 'every good frame reached QEMU, in order');
    t.same(r.seen[0]!.hdr, hdr, 'the virtio-net header (offloads) travels with its frame');
    t.same(r.dropped, { runt: 14, malformed: 1 }, 'each runt and the malformed record counted');
    t.ok(r.port.connected, 'the relay stays connected');
  },
);

t.test('in a gated NIC a runt is never held: only good frames are released', async (t) => {
  const r = await rig(t, 'gated');
  r.send([record(frame(7)), record(Buffer.alloc(13)), record(frame(8))]);
  await waitUntil(() => r.port.gate.heldFrames === 2, 'two frames held');
  t.same(r.seen, [], 'nothing leaves before the ACK');
  await r.port.gate.seal(1);
  r.port.gate.release(1);
  await waitUntil(() => r.seqs().includes(8), 'frame 8 at QEMU');
  t.same(r.seqs(), [7, 8]);
  t.same(r.dropped, { runt: 1 });
});

t.test("QEMU's headerless announce is fixed up and leaves at once, past the held frames", async (t) => {
  const r = await rig(t, 'gated');
  const rarp = Buffer.alloc(60, 0);
  rarp.fill(0xff, 0, 6);
  Buffer.from([0x52, 0x54, 0x00, 0xbe, 0x00, 0x01]).copy(rarp, 6);
  rarp.writeUInt16BE(0x8035, 12);
  r.send([record(frame(1)), record(rarp, 12, null)]);
  await waitUntil(() => r.seen.length === 1, 'the announce at QEMU');
  t.same(r.seen[0]!.hdr, Buffer.alloc(12), 'given a zero header');
  t.equal(r.seen[0]!.len, 60, 'the whole 60-byte RARP');
  t.equal(r.port.gate.heldFrames, 1, "the guest's frame stays held");
});

t.test('a gate at its bound refuses new frames (counted) and the relay never stops reading', async (t) => {
  const r = await rig(t, 'gated', { maxBytes: 1 << 30, maxFrames: 1500 });
  const n = 4000;
  r.send(Array.from({ length: n }, (_, i) => record(frame(i))));
  await waitUntil(() => r.port.gate.heldFrames + (r.dropped['gate_full'] ?? 0) === n, 'every record read');
  t.ok(r.port.gate.heldFrames <= 1500, `held ${r.port.gate.heldFrames} frames, within the bound of 1500`);
  t.ok((r.dropped['gate_full'] ?? 0) > 0, `${r.dropped['gate_full']} frames refused and counted`);
  await r.port.gate.seal(1);
  r.port.gate.release(1);
  t.equal(r.port.gate.heldFrames, 0, 'all released');
  await waitUntil(() => r.seen.length > 0, 'the release at QEMU');
  r.send([record(frame(99999))]);
  await waitUntil(() => r.port.gate.heldFrames === 1, 'reading on after the release');
});

t.test('a record longer than QEMU allows resets the connection (counted), the relay reconnects', async (t) => {
  const r = await rig(t, 'pass');
  r.send([record(frame(10))]);
  await waitUntil(() => r.seqs().includes(10), 'frame 10 at QEMU');
  const hdr = Buffer.alloc(8);
  hdr.writeUInt32BE(1 << 20);
  hdr.writeUInt32BE(12, 4);
  r.send([hdr]);
  await waitUntil(() => r.outConns() === 2 && r.port.connected, 'the reconnection');
  t.same(r.dropped, { framing: 1 });
  r.send([record(frame(11))]);
  await waitUntil(() => r.seqs().includes(11), 'frame 11 at QEMU');
  t.same(r.seqs(), [10, 11]);
});

t.test('detach: r0 deleted, then r1 only once everything read was written and read by QEMU', async (t) => {
  const r = await rig(t, 'gated');
  r.send([record(frame(1)), record(frame(2))]);
  await waitUntil(() => r.port.gate.heldFrames === 2, 'two frames held');
  await r.port.gate.seal(1);
  r.port.gate.passThrough();
  const cmds: string[] = [];
  const qmp = {
    execute: async <T>(cmd: string, args?: Record<string, unknown>): Promise<T> => {
      cmds.push(`${cmd} ${String(args?.['id'])}`);
      if (cmd === 'chardev-remove' && args?.['id'] === 'nout0') {
        // QEMU's last frames are still in the socket when it closes its end
        r.send([record(frame(3))]);
        r.closeOut();
      }
      if (cmd === 'object-del' && args?.['id'] === 'nrin0') t.same(r.seqs(), [1, 2, 3], 'every frame was at QEMU before r1 went');
      return undefined as T;
    },
  };
  await r.port.detach(qmp);
  t.same(cmds, ['object-del nrout0', 'chardev-remove nout0', 'object-del nrin0', 'chardev-remove nin0']);
  t.notOk(r.port.connected, 'no relay any more');
});

t.test(
  "detach while QEMU reads the in socket slowly: the out socket's EOF strands nothing, every released frame reaches QEMU",
  async (t) => {
    // Megabytes released just before completion sit in the relay's own write buffer when
    // QEMU (a loaded host) reads slowly; chardev-remove of the out socket must not take the
    // in socket down with it.
    const r = await rig(t, 'gated');
    const N = 2000;
    r.send(Array.from({ length: N }, (_, i) => record(frame(i, 1500))));
    await waitUntil(() => r.port.gate.heldFrames === N, `${N} frames held`);
    r.pauseIn();
    await r.port.gate.seal(1);
    r.port.gate.passThrough();
    const qmp = {
      execute: async <T>(cmd: string, args?: Record<string, unknown>): Promise<T> => {
        if (cmd === 'chardev-remove' && args?.['id'] === 'nout0') {
          r.closeOut();
          setTimeout(() => r.resumeIn(), 200).unref();
        }
        if (cmd === 'object-del' && args?.['id'] === 'nrin0') {
          const seqs = r.seqs();
          t.equal(seqs.length, N, 'every released frame was at QEMU before r1 went');
          t.ok(
            seqs.every((s, i) => s === i),
            'in order',
          );
        }
        return undefined as T;
      },
    };
    await r.port.detach(qmp);
    t.same(r.dropped, {}, 'nothing dropped');
  },
);

t.test('a relay whose QEMU sockets never accept: waitConnected fails with ERR_RELAY_CONNECT', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-relay-'));
  const port = new NicPort({
    vm: 'vm1',
    index: 0,
    nic: { mac: '52:54:00:be:00:01', bridge: 'brt', tap: 'tnic' },
    mode: 'gated',
    // nothing listens on these paths: the relay keeps reconnecting
    relay: { in: path.join(dir, 'rin0.sock'), out: path.join(dir, 'rout0.sock') },
    bounds: { maxBytes: 1 << 20, maxFrames: 1024 },
    checkpointWindow: 3,
    log: nullLogger,
  });
  t.teardown(async () => {
    await port.close(false);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  await port.open();
  await t.rejects(port.waitConnected(50), { code: 'ERR_RELAY_CONNECT' });
  t.notOk(port.connected);
});
