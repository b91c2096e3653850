/**
 * The QEMU migration stream is TLS with a per-migration pre-shared key (src/migrate/stream-tls.ts):
 *  - on the wire: a capture of the migration ports sees none of the guest's memcheck pages
 *    (each starts with memcheck's MAGIC word); the control, the same capture of a stream
 *    with TLS switched off (fault plain-stream on both sides), sees them by the thousand;
 *  - a client that reaches the destination's port before the source's QEMU and sends a
 *    plain stream is refused by the destination's QEMU, which goes on listening: the
 *    migration then completes;
 *  - a client that connects first and stays silent freezes QEMU 7.2's incoming TLS
 *    handshake: the destination fences (ERR_INCOMING_STALLED) and the VM runs on, on the
 *    source only (exit 3); the next migration completes.
 * The source's `migrate` waits for a trigger file (fault hold-migrate-trigger), so the
 * second client is first by construction.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import { fileSize, qemuAlive, waitFor } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { ROOT } from '../lab/topology.ts';
import { type Cluster } from '../lab/cluster.ts';
import { assertNotRunningOn, bootCluster } from './scenarios.ts';
import { StreamCapturer } from '../lab/wire/streamcap.ts';
import { MIGRATE_TRIGGER } from '../src/migrate/faults.ts';

/** memcheck's MAGIC (tools/guest/memcheck.c), word 0 of every page it writes, as stored (little-endian). */
const MAGIC = Buffer.alloc(8);
MAGIC.writeBigUInt64LE(0x7465746865726d63n);
/** The destination's migration ports (harness host config). */
const PORTS: [number, number] = [49152, 49160];
const MEMCHECK_MIB = 64;

async function migrateCaptured(
  t: Test,
  c: Cluster,
): Promise<{ code: number | null; matches: number; payloadBytes: number; ports: number[] }> {
  const cap = await StreamCapturer.start(c.dst.ns, `${c.id}b`, PORTS, MAGIC);
  t.teardown(() => cap.kill());
  const mig = await c.migrate();
  t.equal(mig.code, 0, `migrate exits 0: ${mig.stderr.slice(-1500)}`);
  const got = await cap.stop();
  t.ok(got.ports.length >= 1, `the capture saw the migration stream (ports ${got.ports.join(',')}, ${got.payloadBytes} B)`);
  const rep = await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 1, 'on the destination');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination');
  return { code: mig.code, ...got };
}

t.test('on the wire: the migration stream shows no guest memory', async (t) => {
  const c = await bootCluster(t, { vm: { maxBandwidth: 0, memcheckMiB: MEMCHECK_MIB } });
  const r = await migrateCaptured(t, c);
  // memcheck's buffer alone is 64 MiB of pages that all begin with MAGIC
  t.ok(r.payloadBytes > MEMCHECK_MIB * 1024 * 1024, `the stream carried the guest's RAM (${r.payloadBytes} B)`);
  t.equal(r.matches, 0, 'no memcheck page header in the captured payload');
  t.notOk(fs.existsSync(path.join(c.dst.stateDir, c.vmName, 'stream-tls')), 'the destination removed its key files');
  t.notOk(fs.existsSync(path.join(c.src.stateDir, c.vmName, 'stream-tls')), 'the source removed its key files');
});

t.test('control: the same capture of a plain stream finds the guest memory', async (t) => {
  const faults = { source: 'plain-stream', destination: 'plain-stream' };
  const c = await bootCluster(t, { faults, vm: { maxBandwidth: 0, memcheckMiB: MEMCHECK_MIB } });
  const r = await migrateCaptured(t, c);
  // every memcheck page travels once: thousands of page headers
  t.ok(r.matches >= 1000, `memcheck page headers found in the plain stream: ${r.matches}`);
});

/**
 * From the source's namespace, connect to the destination's migration port as soon as it
 * listens (scanning the port range), then `garbage` (a plain QEMU stream header and junk,
 * then wait for the server to close) or `hold` (stay connected, silent, until killed).
 * Prints `connected <port>` and, for garbage, `closed-by-server <bytes received>`.
 */
const CLIENT = `
const net = require('node:net');
const [host, lo, hi, mode] = process.argv.slice(1);
const tryPort = (p) => new Promise((res) => {
  const s = net.connect(+p, host);
  s.once('connect', () => res(s));
  s.once('error', () => res(null));
});
(async () => {
  for (;;) {
    for (let p = +lo; p <= +hi; p++) {
      const s = await tryPort(p);
      if (!s) continue;
      console.log('connected ' + p);
      if (mode === 'hold') { s.on('error', () => {}); return; }
      let got = 0;
      s.on('data', (b) => (got += b.length));
      s.on('error', () => {});
      s.on('close', () => { console.log('closed-by-server ' + got); process.exit(0); });
      const hdr = Buffer.alloc(8); hdr.write('QEVM'); hdr.writeUInt32BE(3, 4);
      s.write(Buffer.concat([hdr, Buffer.alloc(4096, 0x5a)]));
      return;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
})();
`;

function secondClient(t: Test, c: Cluster, mode: 'garbage' | 'hold') {
  const p = spawn('ip', ['netns', 'exec', c.src.ns, process.execPath, '-e', CLIENT, c.dst.addr, String(PORTS[0]), String(PORTS[1]), mode], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  p.stdout.on('data', (d) => (out += d));
  const kill = () => {
    if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
  };
  t.teardown(kill);
  return { output: () => out, kill, exited: new Promise<void>((r) => p.once('exit', () => r())) };
}

t.test('a plain stream that reaches the port first is refused by QEMU; the migration completes', async (t) => {
  const c = await bootCluster(t, { faults: { source: 'hold-migrate-trigger' }, vm: { maxBandwidth: 0 } });
  const migrating = c.migrate();
  const cl = secondClient(t, c, 'garbage');
  await waitFor(() => /closed-by-server/.test(cl.output()), 'the destination QEMU closed the plain stream', 120_000);
  t.match(cl.output(), /closed-by-server 0\n/, 'nothing came back but the close');
  const qlog = path.join(c.dst.stateDir, c.vmName, 'qemu.log');
  await waitFor(() => /TLS handshake failed/.test(fs.readFileSync(qlog, 'utf8')), 'QEMU logs the refused handshake', 30_000);
  t.equal((await c.status(c.dst)).state, 'migrating-in', 'the destination still waits for the source');
  fs.writeFileSync(path.join(c.src.stateDir, c.vmName, MIGRATE_TRIGGER), '');
  const mig = await migrating;
  t.equal(mig.code, 0, `the migration completes: ${mig.stderr.slice(-1500)}`);
  t.equal(mig.result?.outcome, 'completed');
  await assertNotRunningOn(t, c, c.src);
  const rep = await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 1, 'on the destination');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination');
});

t.test('a silent client holding the port first: the destination fences, the VM runs on the source only', async (t) => {
  const c = await bootCluster(t, { faults: { source: 'hold-migrate-trigger' }, vm: { maxBandwidth: 0 } });
  const before = await c.status(c.src);
  const migrating = c.migrate();
  const cl = secondClient(t, c, 'hold');
  await waitFor(() => /connected/.test(cl.output()), 'the silent client connected', 120_000);
  // the source's QEMU now connects behind it and waits in its own handshake
  fs.writeFileSync(path.join(c.src.stateDir, c.vmName, MIGRATE_TRIGGER), '');
  const mig = await migrating;
  t.equal(mig.code, 3, `rolled back: exit 3 (${mig.stderr.slice(-1500)})`);
  t.equal(mig.result?.outcome, 'rolled-back');
  t.equal(mig.result?.error?.code, 'ERR_INCOMING_STALLED', 'the cause is the stalled incoming stream');
  const s = await c.status(c.src);
  t.equal(s.state, 'running', 'the VM runs on the source');
  t.equal(s.pid, before.pid, 'in the same QEMU: the switchover never happened');
  t.ok(qemuAlive(s.pid));
  await assertNotRunningOn(t, c, c.dst);
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 1, 'on the source after the stall');
  t.same(rep.corrupt, [], 'no CORRUPT on the source');

  // The silent client gone, the same source QEMU migrates (its migration state is not left busy).
  cl.kill();
  await cl.exited;
  const again = await c.migrate();
  t.equal(again.code, 0, `the next migration completes: ${again.stderr.slice(-1500)}`);
  const rep2 = await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 1, 'on the destination');
  t.same(rep2.corrupt, [], 'no CORRUPT on the destination');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT on the source');
});
