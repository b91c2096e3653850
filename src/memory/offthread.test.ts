/**
 * Hashing a large RAM file must not starve the event loop: the source's baseline hash
 * and the destination's collect() run while heartbeats have to keep flowing (a blocked
 * loop lets leases expire and fences fire). Shown with a real peer channel over
 * loopback and a fully allocated 1 GiB RAM file: a heartbeat sent after the hash
 * started arrives before the hash finishes. CPU-heavy: run it under the QEMU lock.
 */
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, rmSync, writeSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import type { Message } from '../peer/messages.ts';
import { PeerChannel } from '../peer/channel.ts';
import { hashFile } from '../native.ts';
import { ramPages } from './ram.ts';
import { ScanTracker } from './scan.ts';
import { scratchDir } from './memory.test-util.ts';

const RAM_BYTES = 1024 * 1024 * 1024;

async function channelPair(t: Test): Promise<{ src: PeerChannel; dst: PeerChannel }> {
  const psk = randomBytes(32);
  const srv = net.createServer();
  const accepted = new Promise<PeerChannel>((resolve, reject) => {
    srv.on('connection', (s) => PeerChannel.accept(s, { psk }).then(resolve, reject));
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const src = await PeerChannel.connect('127.0.0.1', (srv.address() as net.AddressInfo).port, { psk });
  const dst = await accepted;
  t.teardown(() => {
    src.close();
    dst.close();
    srv.close();
  });
  return { src, dst };
}

/** Counts heartbeats arriving at `dst`. */
function heartbeats(dst: PeerChannel): { count: () => number } {
  let n = 0;
  dst.on('message', (m: Message) => {
    if (m.type === 'heartbeat') n++;
  });
  dst.start();
  return { count: () => n };
}

const dir = scratchDir();
const ramPath = join(dir, 'big.ram');
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
{
  // Every page allocated and distinct: nothing is skipped as a hole.
  const fd = openSync(ramPath, 'w');
  const chunk = randomBytes(4 * 1024 * 1024);
  for (let off = 0; off < RAM_BYTES; off += chunk.length) {
    chunk.writeUInt32LE(off / chunk.length, 0);
    writeSync(fd, chunk, 0, chunk.length, off);
  }
  closeSync(fd);
}

t.test("the source's baseline hash (hashFile) leaves the event loop free", async (t) => {
  const { src, dst } = await channelPair(t);
  const hb = heartbeats(dst);
  const fd = openSync(ramPath, 'r');
  t.teardown(() => closeSync(fd));
  const pages = ramPages(RAM_BYTES);
  const table = Buffer.alloc(pages * 8);
  const hashed = hashFile(fd, pages, table, 1).then(() => hb.count());
  await src.send({ type: 'heartbeat', epoch: 0, sentAt: Date.now() });
  t.ok((await hashed) >= 1, 'a heartbeat sent while hashing arrived before the hash finished');
  t.not(table.readBigUInt64LE(8 * (pages - 1)), 0n, 'and the hash covered the whole file');
});

t.test("the destination's collect() leaves the event loop free", async (t) => {
  const { src, dst } = await channelPair(t);
  const hb = heartbeats(dst);
  const tracker = await ScanTracker.open({ ramPath, ramBytes: RAM_BYTES, qemuPid: process.pid, threads: 1 });
  t.teardown(() => tracker.close());
  // S's view: every page zero, so every page of the file is dirty.
  await tracker.start(Buffer.alloc(ramPages(RAM_BYTES) * 8));
  let collected = 0;
  const collecting = tracker.collect().then((d) => {
    collected = d.length;
    return hb.count();
  });
  await src.send({ type: 'heartbeat', epoch: 1, sentAt: Date.now() });
  t.ok((await collecting) >= 1, 'a heartbeat sent while scanning arrived before the scan finished');
  t.equal(collected, ramPages(RAM_BYTES), 'every page found dirty');
});
