/**
 * Real QEMU 7.2, no guest kernel (SeaBIOS idles): process lifecycle, QMP, and the
 * restore path on S (docs/design.md, "Restore before fence") — fresh QEMU + same RAM file + device state loaded
 * with -incoming exec:cat <file> and migration.send-configuration=off.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import type { VmConfig } from '../src/config/types.ts';
import { isTetherError } from '../src/errors.ts';
import { QemuProcess, type QemuStartOptions } from '../src/qemu/process.ts';

const MiB = 1024 * 1024;
const MEM_MIB = 64;

function vmConfig(over: Partial<VmConfig['qemu']> = {}): VmConfig {
  return {
    name: 'launch',
    qemu: { binary: 'qemu-system-x86_64', accel: 'tcg', machine: 'pc', cpu: 'max', extraArgs: [], ...over },
    memoryMiB: MEM_MIB,
    cpus: 1,
    kernel: '',
    append: '',
    checkpoint: { intervalMs: 50, failoverTimeoutMs: 3000, fenceTimeoutMs: 1500, dirtyTracker: 'auto', hashThreads: 1, window: 3 },
    migration: { precopyMs: 0, maxBandwidth: 0, hotStandby: true },
  };
}

function workdir(t: Test): string {
  const dir = fs.mkdtempSync('/dev/shm/tether-qemu-test-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function opts(dir: string, over: Partial<QemuStartOptions> = {}): QemuStartOptions {
  return {
    vm: vmConfig(),
    ramFile: path.join(dir, 'ram'),
    qmpSocket: path.join(dir, 'qmp.sock'),
    serialLog: path.join(dir, 'serial.log'),
    dieWithParent: true, // no orphaned QEMU even if tap kills this process
    ...over,
  };
}

/** Start and make sure the process dies with the test, pass or fail. */
async function start(t: Test, o: QemuStartOptions): Promise<QemuProcess> {
  const q = await QemuProcess.start(o);
  t.teardown(() => q.kill());
  return q;
}

async function status(q: QemuProcess): Promise<string> {
  return (await q.qmp.execute<{ status: string }>('query-status')).status;
}

async function startError(p: Promise<unknown>): Promise<{ code: string; message: string; details: Record<string, unknown> }> {
  try {
    const q = await p;
    if (q instanceof QemuProcess) await q.kill();
  } catch (e) {
    if (isTetherError(e)) return { code: e.code, message: e.message, details: e.details ?? {} };
    throw e;
  }
  throw new Error('expected start to fail');
}

t.test('start, stop/cont with events, kill: socket removed, RAM file kept', async (t) => {
  const dir = workdir(t);
  const o = opts(dir);
  const q = await start(t, o);
  t.ok(q.pid > 0, 'has a pid');
  t.equal(q.state, 'running');
  t.equal(q.qmp.greeting.version.qemu.major, 7);
  t.equal(await status(q), 'running');
  t.ok(fs.statSync(o.qmpSocket).isSocket(), 'QMP socket exists');

  const stopEv = q.qmp.waitForEvent('STOP', undefined, 60_000);
  await q.qmp.execute('stop');
  await stopEv;
  t.equal(await status(q), 'paused');

  const resumeEv = q.qmp.waitForEvent('RESUME', undefined, 60_000);
  await q.qmp.execute('cont');
  await resumeEv;
  t.equal(await status(q), 'running');

  const exit = await q.kill();
  t.same(exit, { code: null, signal: 'SIGKILL' });
  t.equal(q.state, 'exited');
  t.same(await q.exited, exit, 'exited resolves with the same status');
  t.notOk(fs.existsSync(o.qmpSocket), 'QMP socket removed after SIGKILL');
  t.equal(fs.statSync(o.ramFile).size, MEM_MIB * MiB, 'RAM file survives');
  t.ok(q.qmp.closed, 'QMP client closed');
  t.ok(fs.readFileSync(path.join(dir, 'qemu-launch.log'), 'utf8').includes('tether: spawn'), 'log file written');
});

t.test('stop(): graceful quit', async (t) => {
  const dir = workdir(t);
  const o = opts(dir);
  const q = await start(t, o);
  const exit = await q.stop({ graceMs: 5000 });
  t.same(exit, { code: 0, signal: null });
  t.notOk(fs.existsSync(o.qmpSocket));
  t.ok(fs.existsSync(o.ramFile));
  t.same(await q.stop(), exit, 'stop after exit is a no-op');
});

t.test('restore: fresh QEMU from the same RAM file + saved device state runs', async (t) => {
  const dir = workdir(t);
  const o = opts(dir);
  const devState = path.join(dir, "dev state 'k'"); // exercise the /bin/sh quoting of exec:
  const first = await start(t, o);
  await first.qmp.execute('stop');
  await first.qmp.execute('xen-save-devices-state', { filename: devState, live: false });
  t.ok(fs.statSync(devState).size > 0, 'device state written');
  // The wedged-source case: no quit, just SIGKILL.
  await first.kill();

  // Stand-in for applied checkpoint pages: a marker at 32 MiB (unused by the idle firmware).
  const marker = Buffer.from('tether checkpoint page marker');
  const fd = fs.openSync(o.ramFile, 'r+');
  fs.writeSync(fd, marker, 0, marker.length, 32 * MiB);
  fs.closeSync(fd);

  const t0 = Date.now();
  const second = await start(t, { ...o, incoming: { kind: 'exec-file', file: devState } });
  // A restore starts paused (-S): the sidecar reconnects the NICs, then says cont.
  await second.waitForStatus('paused', 60_000);
  await second.qmp.execute('cont');
  await second.waitForStatus('running', 60_000);
  t.comment(`restore to running: ${Date.now() - t0} ms`);
  t.pass('restored QEMU is running');
  const mig = await second.qmp.execute<{ status?: string }>('query-migrate');
  t.equal(mig.status, 'completed', 'incoming device-state load completed');

  await second.qmp.execute('stop');
  const back = Buffer.alloc(marker.length);
  const fd2 = fs.openSync(o.ramFile, 'r');
  fs.readSync(fd2, back, 0, back.length, 32 * MiB);
  fs.closeSync(fd2);
  t.same(back, marker, 'RAM file content kept as is by the restoring QEMU');
  await second.qmp.execute('cont');
  t.equal(await status(second), 'running', 'restored VM can be paused and resumed');
  await second.stop();
});

t.test('restore from a corrupt device-state file fails visibly', async (t) => {
  const dir = workdir(t);
  const bad = path.join(dir, 'garbage');
  fs.writeFileSync(bad, Buffer.alloc(4096, 0x5a));
  let code: string;
  try {
    const q = await start(t, opts(dir, { incoming: { kind: 'exec-file', file: bad } }));
    try {
      // QEMU exits on the bad stream; the bound only keeps a broken run from hanging
      await q.waitForStatus('running', 60_000);
      code = 'ran';
    } catch (e) {
      code = isTetherError(e) ? e.code : String(e);
    }
  } catch (e) {
    code = isTetherError(e) ? e.code : String(e);
  }
  // Depending on timing QEMU dies before or after QMP is up; both are reported as QEMU errors.
  t.ok(['ERR_QEMU_START', 'ERR_QEMU_EXITED'].includes(code), `fails with a QEMU error (${code})`);
});

t.test('start failures: ERR_QEMU_START with stderr tail', async (t) => {
  const dir = workdir(t);
  const e = await startError(QemuProcess.start(opts(dir, { vm: vmConfig({ extraArgs: ['-no-such-option'] }) })));
  t.equal(e.code, 'ERR_QEMU_START');
  t.match(e.message, /no-such-option/, 'message carries QEMU stderr');
  t.equal(e.details['reason'], 'exited');
  t.match(e.details['exit'], { code: 1 });

  const e2 = await startError(QemuProcess.start(opts(dir, { vm: vmConfig({ binary: path.join(dir, 'no-such-qemu') }) })));
  t.equal(e2.code, 'ERR_QEMU_START', 'missing binary');
  t.notOk(fs.existsSync(path.join(dir, 'qmp.sock')));
});

t.test('incoming defer waits in "inmigrate"; a stale socket file is replaced', async (t) => {
  const dir = workdir(t);
  const o = opts(dir);
  fs.writeFileSync(o.qmpSocket, 'stale'); // e.g. left behind by a crashed predecessor
  const q = await start(t, { ...o, incoming: { kind: 'defer' } });
  t.equal(await status(q), 'inmigrate');
  t.ok(fs.statSync(o.qmpSocket).isSocket());
  await q.kill();
  t.notOk(fs.existsSync(o.qmpSocket));
});

t.test("a dead QEMU's cleanup does not remove its successor's socket", async (t) => {
  const dir = workdir(t);
  const o = opts(dir);
  const first = await start(t, o);
  // Successor starts on the same paths while the first is still alive (caller forgot to
  // wait): the first's later exit must leave the successor's QMP socket alone. Its own RAM
  // file: two guests booting in one shared RAM corrupt each other, and a guest that crashes
  // makes its QEMU (-no-reboot) exit 0 before QMP is up (seen once in a loaded CI run).
  const second = await start(t, { ...o, ramFile: path.join(dir, 'ram2') });
  await first.kill();
  t.ok(fs.existsSync(o.qmpSocket), "successor's socket still there");
  t.equal(await status(second), 'running');
  await second.kill();
  t.notOk(fs.existsSync(o.qmpSocket));
});
