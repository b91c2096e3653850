import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import t from 'tap';
import { gateReserve, qemuSendBuffer } from '../gate/reserve.ts';
import { raisePeerSndbuf, sockInq } from './tap.ts';
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

/**
 * The derivation's premises, on a real unix stream socket pair written the way QEMU's
 * filter-redirector writes (three writes per record, non-blocking here so that "full"
 * is observable as EAGAIN): the bytes and records queued before the writer blocks stay
 * within the reserve for the writer's send buffer, whatever the reader's receive buffer,
 * and the production decoder gets every record back.
 */
t.test("a full relay socket holds no more than the reserve for the writer's send buffer", async (t) => {
  const sndbuf = qemuSendBuffer();
  for (const frameLen of [60, 1514, 65_000]) {
    const [w, r] = await socketPair();
    try {
      const fd = (w as unknown as { _handle: { fd: number } })._handle.fd;
      let queued = 0;
      let records = 0;
      let frameBytes = 0;
      const payload = Buffer.alloc(VNET_HDR_BYTES + frameLen, 9);
      const prefix = Buffer.alloc(8);
      prefix.writeUInt32BE(payload.length, 0);
      prefix.writeUInt32BE(VNET_HDR_BYTES, 4);
      // three separate writes per record, as QEMU makes them; stop at the first short one
      outer: for (;;) {
        for (const part of [prefix.subarray(0, 4), prefix.subarray(4), payload]) {
          const n = writeSome(fd, part);
          queued += n;
          if (n < part.length) break outer;
        }
        records++;
        frameBytes += frameLen;
      }
      const reserve = gateReserve(sndbuf);
      t.ok(frameBytes <= reserve.bytes, `${frameLen}: ${frameBytes} frame bytes queued <= reserve ${reserve.bytes}`);
      t.ok(records + 1 <= reserve.frames, `${frameLen}: ${records} whole records (+1 partial) within ${reserve.frames} frames`);
      const dec = new RelayDecoder();
      let got = 0;
      await new Promise<void>((done) => {
        let read = 0;
        r.on('data', (c: Buffer) => {
          got += dec.push(c).filter((x) => x.kind === 'frame').length;
          read += c.length;
          if (read >= queued) done();
        });
        r.resume();
      });
      t.equal(got, records, `${frameLen}: the decoder returns every whole record`);
    } finally {
      w.destroy();
      r.destroy();
    }
  }
});

/** A connected unix stream pair; the writer side is read-paused so nothing is consumed. */
async function socketPair(): Promise<[net.Socket, net.Socket]> {
  const p = `/tmp/tether-reserve-${process.pid}-${Math.random().toString(16).slice(2)}.sock`;
  const srv = net.createServer();
  await new Promise<void>((res) => srv.listen(p, res));
  const acc = new Promise<net.Socket>((res) => srv.once('connection', res));
  const w = net.createConnection(p);
  await new Promise((res) => w.once('connect', res));
  const r = await acc;
  r.pause();
  srv.close();
  fs.rmSync(p, { force: true });
  return [w, r];
}

/** write(2) on a non-blocking fd: bytes taken (0 on EAGAIN). */
function writeSome(fd: number, b: Buffer): number {
  try {
    return fs.writeSync(fd, b);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return 0;
    throw e;
  }
}

/**
 * The relay raises the send buffer of QEMU's end of the out socket (raisePeerSndbuf:
 * pidfd_getfd + SO_SNDBUFFORCE, root). A child process stands in for QEMU: it listens,
 * accepts and writes records without end; nobody reads. Before the raise its writes stop
 * at the default buffer; after it, it queues more than that.
 */
t.test(
  "raisePeerSndbuf: the writer's (QEMU's) socket takes more before it blocks",
  { skip: process.getuid?.() !== 0 ? 'needs root' : false },
  async (t) => {
    const p = `/tmp/tether-peer-${process.pid}.sock`;
    fs.rmSync(p, { force: true });
    const child = spawn(
      process.execPath,
      [
        '-e',
        `const net = require('node:net');
       const srv = net.createServer((s) => {
         const rec = Buffer.alloc(8 + 1526, 1); rec.writeUInt32BE(1526, 0); rec.writeUInt32BE(12, 4);
         const pump = () => { while (s.write(rec)); s.once('drain', pump); };
         process.stdin.on('data', () => pump());
         process.stdout.write('accepted\\n');
       });
       srv.listen(${JSON.stringify(p)}, () => process.stdout.write('listening\\n'));`,
      ],
      { stdio: ['pipe', 'pipe', 'inherit'] },
    );
    t.teardown(() => {
      child.kill('SIGKILL');
      fs.rmSync(p, { force: true });
    });
    const said = (what: string) =>
      new Promise<void>((res) => {
        const on = (d: Buffer) => {
          if (d.toString().includes(what)) {
            child.stdout!.off('data', on);
            res();
          }
        };
        child.stdout!.on('data', on);
      });
    await said('listening');
    t.equal(raisePeerSndbuf(child.pid!, p, 8 << 20), 0, 'a listening socket alone is not raised');
    const acc = said('accepted');
    const s = net.createConnection(p);
    s.pause();
    await acc;
    const fd = (s as unknown as { _handle: { fd: number } })._handle.fd;
    const got = raisePeerSndbuf(child.pid!, p, 8 << 20);
    t.ok(got >= 8 << 20, `the accepted socket's SO_SNDBUF is now ${got}`);
    child.stdin!.write('go\n');
    await waitUntil(() => sockInq(fd) > qemuSendBuffer());
    t.ok(sockInq(fd) > qemuSendBuffer(), `the writer queued ${sockInq(fd)} bytes, more than the default buffer ${qemuSendBuffer()}`);
    s.destroy();
  },
);

async function waitUntil(ok: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !ok(); i++) await new Promise((r) => setTimeout(r, 10));
}
