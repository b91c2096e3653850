/**
 * A guest cannot crash the sidecar with the frames it sends. The production NicPort with a
 * real TAP in a bridge, in a private network namespace (the file re-executes itself under
 * `unshare -n`; root, as the sidecar runs): a stand-in for QEMU's stream netdev sends runt
 * frames (1..13 bytes: tun answers EINVAL to them) between good ones; the runts are
 * counted and dropped, the good frames reach the bridge, the process lives on.
 */
import { spawnSync, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const SELF = fileURLToPath(import.meta.url);

if (process.env.TETHER_NIC_TEST_NETNS !== '1' && process.getuid?.() !== 0) {
  process.stdout.write('TAP version 14\n1..0 # SKIP TAP devices need root (as the sidecar runs)\n');
} else if (process.env.TETHER_NIC_TEST_NETNS !== '1') {
  // the TAP output of the child is this file's
  const r = spawnSync('unshare', ['-n', process.execPath, ...process.execArgv, SELF], {
    stdio: 'inherit',
    env: { ...process.env, TETHER_NIC_TEST_NETNS: '1' },
  });
  process.exitCode = r.status ?? 1;
} else {
  await inNetns();
}

async function inNetns(): Promise<void> {
  const { default: t } = await import('tap');
  const { encodeFrames } = await import('../gate/codec.ts');
  const { nullLogger } = await import('../util/log.ts');
  const { sleep } = await import('../util/time.ts');
  const { NicPort } = await import('./nic.ts');
  const { TapDevice } = await import('./tap.ts');
  type NicCounters = import('./nic.ts').NicCounters;

  const ip = (...a: string[]) => execFileSync('ip', a, { encoding: 'utf8' });
  ip('link', 'set', 'lo', 'up');
  ip('link', 'add', 'brt', 'type', 'bridge');
  ip('link', 'set', 'brt', 'up');

  const waitUntil = async (fn: () => boolean, what: string): Promise<void> => {
    const deadline = Date.now() + 30_000;
    while (!fn()) {
      if (Date.now() > deadline) throw new Error(`waited 30 s in vain for ${what}`);
      await sleep(5);
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

  async function rig(t: import('tap').Test, mode: 'pass' | 'gated') {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-nic-'));
    const sock = path.join(dir, 'net0.sock');
    // QEMU's side: the stream netdev server; the test writes length-prefixed frames to it
    let qemu: net.Socket | undefined;
    const all: net.Socket[] = [];
    const srv = net.createServer((s) => {
      s.on('error', () => {});
      qemu = s;
      all.push(s);
    });
    await new Promise<void>((r) => srv.listen(sock, r));
    t.teardown(async () => {
      for (const s of all) s.destroy();
      await new Promise<void>((r) => srv.close(() => r()));
      fs.rmSync(dir, { recursive: true, force: true });
    });
    // the wire: another port of the bridge
    const wire = await TapDevice.open('tobs', 'brt');
    t.teardown(() => wire.close(true));
    const seen: number[] = [];
    wire.startReading((frames) => {
      for (const f of frames) if (f.length >= 18 && f.readUInt16BE(12) === 0x88b5) seen.push(f.readUInt32BE(14));
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
      toGuest: noop,
      toGuestDropped: noop,
      tapRetry: noop,
      dropped: (reason, n) => (dropped[reason] = (dropped[reason] ?? 0) + n),
    };
    const port = new NicPort({
      vm: 'vm1',
      index: 0,
      nic: { mac: '52:54:00:be:00:01', bridge: 'brt', tap: 'tnic' },
      socketPath: sock,
      mode,
      bounds: { maxBytes: 64 * 1024 * 1024, maxFrames: 1 << 20 },
      checkpointWindow: 3,
      log: nullLogger,
      counters,
    });
    t.teardown(() => port.close(true));
    await port.open();
    await port.waitConnected(10_000);
    await waitUntil(() => qemu !== undefined, 'the connection');
    return {
      port,
      send: (frames: Buffer[]) => qemu!.write(encodeFrames(frames)),
      raw: (b: Buffer) => qemu!.write(b),
      connections: () => all.length,
      seen,
      dropped,
    };
  }

  t.test('runt frames from the guest are counted and dropped; the good ones pass, the sidecar lives', async (t) => {
    const r = await rig(t, 'pass');
    const runts = Array.from({ length: 13 }, (_, i) => Buffer.alloc(i + 1, 0xee));
    r.send([frame(1), ...runts, frame(2)]);
    await waitUntil(() => r.seen.includes(2), 'frame 2 on the wire');
    r.send(runts.slice(0, 1)); // a runt alone in its chunk
    r.send([frame(3)]);
    await waitUntil(() => r.seen.includes(3), 'frame 3 on the wire');
    t.same(r.seen, [1, 2, 3], 'every good frame reached the wire, in order');
    t.same(r.dropped, { runt: 14 }, 'each runt counted');
    t.ok(r.port.connected, 'the connection to QEMU stays up');
  });

  t.test('in a gated NIC a runt is never held: only good frames are released', async (t) => {
    const r = await rig(t, 'gated');
    r.send([frame(7), Buffer.alloc(13), frame(8)]);
    await waitUntil(() => r.port.gate.heldFrames === 2, 'two frames held');
    await r.port.gate.seal(1);
    r.port.gate.release(1);
    await waitUntil(() => r.seen.includes(8), 'frame 8 on the wire');
    t.same(r.seen, [7, 8]);
    t.same(r.dropped, { runt: 1 });
  });

  t.test('a write the TAP refuses is counted and dropped, never thrown out of the handler', async (t) => {
    const r = await rig(t, 'pass');
    // past the ingress check, straight into the gate: the TAP itself answers EINVAL
    t.doesNotThrow(() => r.port.gate.fromGuest([Buffer.alloc(5)]));
    t.same(r.dropped, { tap_error: 1 });
    r.send([frame(9)]);
    await waitUntil(() => r.seen.includes(9), 'frame 9 on the wire');
    t.same(r.seen, [9], 'the NIC goes on');
  });

  t.test('a frame longer than the stream allows resets the connection (counted), the NIC reconnects', async (t) => {
    const r = await rig(t, 'pass');
    r.send([frame(10)]);
    await waitUntil(() => r.seen.includes(10), 'frame 10 on the wire');
    const hdr = Buffer.alloc(4);
    hdr.writeUInt32BE(1 << 20); // beyond MAX_FRAME_BYTES: framing lost
    r.raw(hdr);
    await waitUntil(() => r.connections() === 2, 'the reconnection');
    t.same(r.dropped, { framing: 1 });
    r.send([frame(11)]);
    await waitUntil(() => r.seen.includes(11), 'frame 11 on the wire');
    t.same(r.seen, [10, 11]);
  });
}
