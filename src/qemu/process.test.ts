/** QemuProcess failure paths with a fake "qemu" (a shell script): no real QEMU needed. */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { VmConfig } from '../config/types.ts';
import { isTetherError } from '../errors.ts';
import { spawn } from 'node:child_process';
import { identityAlive, killIdentity, procStartTime, QemuProcess } from './process.ts';

function setup(t: Test, script: string): { dir: string; vm: VmConfig } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-proc-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const bin = path.join(dir, 'fake-qemu');
  fs.writeFileSync(bin, `#!/bin/sh\n${script}\n`, { mode: 0o755 });
  const vm: VmConfig = {
    name: 'fake',
    qemu: { binary: bin, accel: 'tcg', machine: 'pc', cpu: 'max', extraArgs: [] },
    memoryMiB: 64,
    cpus: 1,
    kernel: '',
    append: '',
    checkpoint: { intervalMs: 50, failoverTimeoutMs: 3000, fenceTimeoutMs: 1500, dirtyTracker: 'auto', hashThreads: 1, window: 3 },
    migration: { precopyMs: 0, maxBandwidth: 0, hotStandby: true },
  };
  return { dir, vm };
}

async function startErr(p: Promise<QemuProcess>): Promise<{ code: string; message: string; details: Record<string, unknown> }> {
  try {
    const q = await p;
    await q.kill();
  } catch (e) {
    if (isTetherError(e)) return { code: e.code, message: e.message, details: e.details ?? {} };
    throw e;
  }
  throw new Error('start unexpectedly succeeded');
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

t.test('QEMU exiting before QMP is up: ERR_QEMU_START with stderr tail and exit code', async (t) => {
  const { dir, vm } = setup(t, 'echo "qemu-system-x86_64: -bogus: invalid option" >&2; exit 3');
  const e = await startErr(
    QemuProcess.start({ vm, ramFile: path.join(dir, 'ram'), qmpSocket: path.join(dir, 'q.sock'), serialLog: path.join(dir, 's.log') }),
  );
  t.equal(e.code, 'ERR_QEMU_START');
  t.match(e.message, /-bogus: invalid option/);
  t.match(e.details, { reason: 'exited', exit: { code: 3, signal: null } });
  t.match(fs.readFileSync(path.join(dir, 'qemu-fake.log'), 'utf8'), /invalid option/, 'stderr also in the log file');
  t.notOk(fs.existsSync(path.join(dir, 'ram')), 'start never creates or deletes the RAM file itself');
});

t.test('QMP never appears: ERR_QEMU_START after startTimeoutMs, process killed', async (t) => {
  const { dir, vm } = setup(t, 'echo $$ > "$(dirname "$0")/pid"; exec sleep 30');
  const e = await startErr(
    QemuProcess.start({
      vm,
      ramFile: path.join(dir, 'ram'),
      qmpSocket: path.join(dir, 'q.sock'),
      serialLog: path.join(dir, 's.log'),
      startTimeoutMs: 300,
    }),
  );
  t.equal(e.code, 'ERR_QEMU_START');
  t.match(e.details, { reason: 'ERR_QMP_CONNECT', exit: { signal: 'SIGKILL' } });
  const pid = Number(fs.readFileSync(path.join(dir, 'pid'), 'utf8'));
  t.notOk(alive(pid), 'the hung process was killed');
});

t.test('missing binary: ERR_QEMU_START', async (t) => {
  const { dir, vm } = setup(t, 'exit 0');
  vm.qemu.binary = path.join(dir, 'nope');
  const e = await startErr(
    QemuProcess.start({ vm, ramFile: path.join(dir, 'ram'), qmpSocket: path.join(dir, 'q.sock'), serialLog: path.join(dir, 's.log') }),
  );
  t.equal(e.code, 'ERR_QEMU_START');
  t.match(e.message, /ENOENT|could not be spawned/);
});

t.test('a QEMU is known by pid + start time: a process that reused the pid is neither alive nor killed', async (t) => {
  const p = spawn('sleep', ['60'], { stdio: 'ignore' });
  t.teardown(() => p.kill('SIGKILL'));
  const st = procStartTime(p.pid!);
  t.type(st, 'string');
  t.ok(identityAlive({ pid: p.pid!, startTime: st! }), 'the recorded identity');
  const reused = { pid: p.pid!, startTime: String(Number(st) - 1) };
  t.notOk(identityAlive(reused), 'same pid, another start time: not our QEMU');
  t.ok(await killIdentity(reused), 'nothing of ours to kill');
  t.equal(p.exitCode, null);
  t.equal(p.signalCode, null, 'the process holding the pid was not signalled');
  t.ok(await killIdentity({ pid: p.pid!, startTime: st! }));
  t.equal(procStartTime(p.pid!), null, 'killed and reaped');
});
