/**
 * The NBD server against real clients nobody here wrote — QEMU's qemu-io and qemu-img,
 * libnbd's nbdinfo — over a unix socket, serving a raw file. Every pattern is verified
 * by reading the file directly. Hostile byte sequences go through a raw socket.
 */
import t from 'tap';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { BlockDevice } from '../disk/block-device.ts';
import { FileBlockDevice } from '../disk/file-device.ts';
import { nullLogger } from '../util/log.ts';
import * as P from './protocol.ts';
import { NbdServer } from './server.ts';
import { clientFlags, handle, optGo, request } from './nbd.test-util.ts';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

async function setup(t: { teardown(fn: () => unknown): void }, opts: { maxInFlight?: number; device?: BlockDevice } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-nbd-'));
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, SIZE);
  const dev = opts.device ?? (await FileBlockDevice.open(image));
  const sock = path.join(dir, 'nbd.sock');
  const server = new NbdServer({
    device: dev,
    exportName: 'vm1',
    log: nullLogger,
    ...(opts.maxInFlight ? { maxInFlight: opts.maxInFlight } : {}),
  });
  await server.listen(sock);
  t.teardown(async () => {
    await server.close();
    await dev.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const uri = `nbd+unix:///vm1?socket=${sock}`;
  const file = (off: number, len: number): Buffer => {
    const fd = fs.openSync(image, 'r');
    try {
      const b = Buffer.alloc(len);
      fs.readSync(fd, b, 0, len, off);
      return b;
    } finally {
      fs.closeSync(fd);
    }
  };
  return { dir, image, sock, server, uri, file };
}

async function qemuIo(uri: string, cmds: string[]): Promise<string> {
  const { stdout } = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri]);
  if (/failed|error/i.test(stdout)) throw new Error(`qemu-io reported: ${stdout}`);
  return stdout;
}

t.test('nbdinfo sees the export: size and features', async (t) => {
  const { uri } = await setup(t);
  const { stdout } = await run('nbdinfo', ['--json', uri]);
  const info = JSON.parse(stdout) as { protocol: string; exports: Record<string, unknown>[] };
  t.equal(info.protocol, 'newstyle-fixed');
  const e = info.exports[0]!;
  t.equal(e['export-name'], 'vm1');
  t.equal(e['export-size'], SIZE);
  for (const k of ['can_flush', 'can_fua', 'can_trim', 'can_zero']) t.equal(e[k], true, k);
  for (const k of ['is_read_only', 'can_df', 'can_cache', 'can_fast_zero']) t.equal(e[k], false, k);
  t.equal(e['block_size_minimum'], 1);
  t.equal(e['block_size_preferred'], 4096);
  t.equal(e['block_size_maximum'], 32 * MiB);
  const list = await run('nbdinfo', ['--list', '--json', uri.replace('/vm1?', '/?')]);
  t.same(
    (JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }).exports.map((x) => x['export-name']),
    ['vm1'],
    'OPT_LIST names the one export',
  );
});

t.test('qemu-io: write/read/discard/write-zeroes/flush patterns land in the file', async (t) => {
  const { uri, file } = await setup(t);
  await qemuIo(uri, [
    'write -P 0x11 0 64k',
    'write -P 0x22 1000 3000', // unaligned
    'write -f -P 0x33 1M 128k', // FUA
    'write -P 0x44 16376k 8k', // the last 8 KiB
    'write -P 0x55 2M 4M', // several requests' worth
    'write -P 0x66 8M 1M',
    'discard 8M 512k',
    'write -P 0x77 12M 1M',
    'write -z 12M 256k', // NO_HOLE write-zeroes
    'write -z -u 12544k 256k', // may punch a hole
    'flush',
    'read -P 0x11 0 1000',
    'read -P 0x22 1000 3000',
    'read -P 0x11 4000 61536',
    'read -P 0x33 1M 128k',
    'read -P 0x44 16376k 8k',
    'read -P 0x0 12M 512k',
    'read -P 0x77 12800k 512k',
  ]);
  const expect = (off: number, len: number, byte: number, what: string) =>
    t.ok(file(off, len).equals(Buffer.alloc(len, byte)), `${what}: file holds 0x${byte.toString(16)} at ${off}+${len}`);
  expect(0, 1000, 0x11, 'aligned write');
  expect(1000, 3000, 0x22, 'unaligned write');
  expect(4000, 65536 - 4000, 0x11, 'untouched tail of the first write');
  expect(MiB, 128 * 1024, 0x33, 'FUA write');
  expect(16376 * 1024, 8192, 0x44, 'last 8 KiB');
  expect(2 * MiB, 4 * MiB, 0x55, '4 MiB write');
  expect(8 * MiB + 512 * 1024, 512 * 1024, 0x66, 'beside the discard');
  expect(12 * MiB, 512 * 1024, 0x00, 'write-zeroes');
  expect(12 * MiB + 512 * 1024, 512 * 1024, 0x77, 'beside the write-zeroes');
  t.equal(fs.statSync(path.dirname(uri.split('socket=')[1]!) + '/disk.img').size, SIZE, 'size unchanged');
});

t.test('qemu-io: pipelined aio requests all get their replies', async (t) => {
  const { uri, file } = await setup(t);
  const cmds: string[] = [];
  for (let i = 0; i < 32; i++) cmds.push(`aio_write -P ${i + 1} ${i * 64}k 64k`);
  cmds.push('aio_flush');
  for (let i = 0; i < 32; i++) cmds.push(`aio_read -P ${i + 1} ${i * 64}k 64k`);
  cmds.push('aio_flush');
  await qemuIo(uri, cmds);
  for (let i = 0; i < 32; i++) t.ok(file(i * 65536, 65536).equals(Buffer.alloc(65536, i + 1)), `block ${i}`);
});

t.test('qemu-img: convert a random image in, compare it out', async (t) => {
  const { uri, dir, file } = await setup(t);
  const src = path.join(dir, 'src.img');
  const data = crypto.randomBytes(SIZE);
  data.fill(0, 4 * MiB, 8 * MiB); // a zero run: qemu-img uses write-zeroes for it
  fs.writeFileSync(src, data);
  fs.writeFileSync(path.join(dir, 'junk'), ''); // nothing else in the way
  await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri]);
  t.ok(file(0, SIZE).equals(data), 'the file equals the source byte for byte');
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri]);
  t.match(cmp.stdout, /Images are identical/);
});

/** A raw client: handshake with OPT_GO, then whatever bytes the test sends. */
async function rawClient(sock: string): Promise<{ s: net.Socket; received: () => Buffer; closed: Promise<void> }> {
  const s = net.connect(sock);
  let buf = Buffer.alloc(0);
  s.on('data', (d: Buffer) => (buf = Buffer.concat([buf, d])));
  const closed = new Promise<void>((resolve) => s.on('close', () => resolve()));
  await new Promise<void>((resolve) => s.once('connect', () => resolve()));
  s.write(Buffer.concat([clientFlags(), optGo('vm1')]));
  // greeting 18 + INFO export 20+12 + INFO block size 20+14 + ACK 20
  await until(() => buf.length >= 18 + 32 + 34 + 20);
  const handshake = buf.length;
  return { s, received: () => buf.subarray(handshake), closed };
}

async function until(cond: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  if (!cond()) throw new Error('timed out waiting');
}

t.test('raw client: out-of-range writes are refused and never touch the file', async (t) => {
  const { sock, file } = await setup(t);
  const c = await rawClient(sock);
  const before = file(SIZE - 4096, 4096);
  c.s.write(
    Buffer.concat([
      request({ type: P.CMD_WRITE, handle: handle(1), offset: SIZE - 10 }, Buffer.alloc(20, 0xee)),
      request({ type: P.CMD_WRITE_ZEROES, handle: handle(2), offset: SIZE, length: 512 }),
      request({ type: P.CMD_WRITE, handle: handle(3), offset: (1n << 64n) - 10n }, Buffer.alloc(20, 0xee)),
      request({ type: P.CMD_READ, handle: handle(4), offset: SIZE - 1, length: 2 }),
      request({ type: P.CMD_WRITE, handle: handle(5), offset: 0 }, Buffer.alloc(8, 0xcc)),
    ]),
  );
  await until(() => c.received().length >= 5 * 16);
  const r = c.received();
  const replies = new Map<string, number>();
  for (let i = 0; i < 5; i++) replies.set(r.subarray(i * 16 + 8, i * 16 + 16).toString('hex'), r.readUInt32BE(i * 16 + 4));
  t.same(
    [1, 2, 3, 4, 5].map((n) => replies.get(handle(n).toString('hex'))),
    [P.ENOSPC, P.ENOSPC, P.ENOSPC, P.EINVAL, 0],
  );
  t.ok(file(SIZE - 4096, 4096).equals(before), 'the end of the image is unchanged');
  t.ok(file(0, 8).equals(Buffer.alloc(8, 0xcc)), 'the valid write after them landed');
  t.equal(fs.statSync(path.join(path.dirname(sock), 'disk.img')).size, SIZE, 'the image did not grow');
  c.s.destroy();
});

t.test('raw client: bad magic drops the connection; the server keeps serving others', async (t) => {
  const { sock, uri } = await setup(t);
  const c = await rawClient(sock);
  c.s.write(request({ type: P.CMD_READ, length: 512 }, Buffer.alloc(0), 0xdeadbeef));
  await c.closed;
  t.pass('server closed the connection');
  await qemuIo(uri, ['read -P 0 0 4k']);
  t.pass('a new client is served');
});

t.test('raw client: DISC finishes the requests in flight, then closes', async (t) => {
  const { sock } = await setup(t);
  const c = await rawClient(sock);
  c.s.write(
    Buffer.concat([
      request({ type: P.CMD_READ, handle: handle(1), offset: 0, length: 65536 }),
      request({ type: P.CMD_DISC, handle: handle(2) }),
    ]),
  );
  await c.closed;
  t.equal(c.received().length, 16 + 65536, 'the read was answered before the close');
});

/** A device whose operations wait until released: observes concurrency. */
class GateDevice implements BlockDevice {
  readonly size = SIZE;
  readonly canTrim = false;
  running = 0;
  maxRunning = 0;
  waiting: (() => void)[] = [];
  async read(_o: number, length: number): Promise<Buffer> {
    this.running++;
    this.maxRunning = Math.max(this.maxRunning, this.running);
    await new Promise<void>((r) => this.waiting.push(r));
    this.running--;
    return Buffer.alloc(length);
  }
  async write(): Promise<void> {}
  async flush(): Promise<void> {}
  async trim(): Promise<void> {}
  async writeZeroes(): Promise<void> {}
  async close(): Promise<void> {}
}

t.test('in-flight requests are bounded; idle() waits for them', async (t) => {
  const dev = new GateDevice();
  const { sock, server } = await setup(t, { maxInFlight: 2, device: dev });
  const c = await rawClient(sock);
  const reqs = [1, 2, 3, 4, 5].map((n) => request({ type: P.CMD_READ, handle: handle(n), offset: n * 512, length: 512 }));
  c.s.write(Buffer.concat(reqs));
  await until(() => dev.waiting.length === 2);
  await new Promise((r) => setTimeout(r, 50));
  t.equal(dev.running, 2, 'only two requests run');
  let idle = false;
  void server.idle().then(() => (idle = true));
  while (c.received().length < 5 * (16 + 512)) {
    dev.waiting.shift()?.();
    await new Promise((r) => setTimeout(r, 5));
  }
  t.equal(dev.maxRunning, 2, 'never more than maxInFlight');
  await until(() => idle);
  t.ok(idle, 'idle once all finished');
  c.s.destroy();
});

t.test('setDevice swaps what later requests see; size must match', async (t) => {
  const { server, uri, dir } = await setup(t);
  const other = path.join(dir, 'other.img');
  fs.writeFileSync(other, Buffer.alloc(SIZE, 0x5a));
  const dev2 = await FileBlockDevice.open(other);
  t.teardown(() => dev2.close());
  const old = server.setDevice(dev2);
  await qemuIo(uri, ['read -P 0x5a 0 4k']);
  t.equal(server.setDevice(old), dev2);
  await qemuIo(uri, ['read -P 0 0 4k']);
  const small = path.join(dir, 'small.img');
  fs.writeFileSync(small, Buffer.alloc(4096));
  const dev3 = await FileBlockDevice.open(small);
  t.throws(() => server.setDevice(dev3), { code: 'ERR_NBD_DEVICE_SIZE' });
  await dev3.close();
});

t.test('a restarted server listens again on the same path', async (t) => {
  const { server, sock, uri, image } = await setup(t);
  await qemuIo(uri, ['write -P 0x9 0 4k']);
  const dev = server.device;
  await server.close();
  fs.writeFileSync(sock, ''); // whatever a crash left behind is not a socket: refused
  const s2 = new NbdServer({ device: dev, exportName: 'vm1', log: nullLogger });
  await t.rejects(s2.listen(sock), { code: 'ERR_NBD_LISTEN' });
  fs.rmSync(sock);
  // A stale socket file (the old server gone without unlinking) is replaced.
  const stale = net.createServer();
  await new Promise<void>((r) => stale.listen(sock, () => r()));
  (stale as unknown as { _handle: { close(): void } | null })._handle?.close();
  await s2.listen(sock);
  t.teardown(() => s2.close());
  await qemuIo(uri, ['read -P 0x9 0 4k']);
  t.ok(fs.existsSync(image));
});
