/**
 * Hot-standby restore (src/migrate/standby.ts) with real QEMU 7.2 and the memcheck guest:
 * the standby leaves the RAM file alone until the decision, never runs the guest twice,
 * takes over on rollback, is killed on completion, is replaced by a cold start when it
 * died, and is sorted out by a restarted sidecar.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import type { HostConfig, VmConfig } from '../src/config/types.ts';
import { HotStandby, standbySocket } from '../src/migrate/standby.ts';
import { QemuProcess } from '../src/qemu/process.ts';
import { nullLogger } from '../src/util/log.ts';
import { VmInstance } from '../src/vm/instance.ts';
import { fileSize, qemuAlive, qemuPidsWith, waitFor } from '../lab/proc.ts';
import { GUEST } from '../lab/topology.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import type { Cluster } from '../lab/cluster.ts';
import { assertNotRunningOn, assertSurvivedOnSource, bootCluster } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

const MiB = 1024 * 1024;

function sha(file: string, start = 0, end?: number): string {
  const b = fs.readFileSync(file);
  return createHash('sha256')
    .update(b.subarray(start, end ?? b.length))
    .digest('hex');
}

/** sha of the first MiB of `file`, read alone (the RAM file is hundreds of MiB). */
function shaLow(file: string): string {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(MiB);
    const n = fs.readSync(fd, b, 0, MiB, 0);
    return createHash('sha256').update(b.subarray(0, n)).digest('hex');
  } finally {
    fs.closeSync(fd);
  }
}

function srcRam(c: Cluster): string {
  return path.join(c.src.ramDir, `${c.vmName}.ram`);
}

/** QEMUs on the source's RAM file, and the standbys among them. */
function sourceQemus(c: Cluster): { all: number[]; standbys: number[] } {
  const sock = path.join(c.src.stateDir, c.vmName, 'standby.sock');
  return { all: qemuPidsWith(`mem-path=${srcRam(c)},`), standbys: qemuPidsWith(`path=${sock},`) };
}

/** The migration's standby (not the VM's own QEMU, which may be a standby promoted earlier). */
async function standbyUp(c: Cluster): Promise<number> {
  const vmPid = (await c.status(c.src)).pid;
  let pid = 0;
  await waitFor(() => {
    pid = sourceQemus(c).standbys.find((p) => p !== vmPid) ?? 0;
    return pid > 0;
  }, 'a hot standby on the source');
  return pid;
}

/*
 * One cluster for the three cluster scenarios: the first two leave the VM running and
 * verified on the source, and the next starts from there; a fresh boot per scenario would
 * add nothing but the boot. The third migrates it away. (After the first the VM's QEMU is a
 * promoted standby: standbyUp skips it.)
 * The cluster boots in t.before: tap's root test would end by itself while a top-level
 * await keeps it idle.
 */
let c: Cluster;
t.before(async () => {
  // the destination does not ask to complete before a scenario interrupts the migration
  c = await bootCluster(t, { holdCompletion: true });
});

t.test('a dead standby is replaced before the rollback fences anything: the VM is restored', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const sb = await standbyUp(c);
  process.kill(sb, 'SIGKILL');
  await waitFor(() => !qemuAlive(sb), 'standby gone');
  const d = await c.status(c.dst);
  process.kill(d.pid, 'SIGKILL'); // the destination QEMU dies: D reports, S rolls back
  const mig = await migrating;
  // The rollback proves it can restore by loading the checkpoint into a standby: the dead
  // one is replaced by a fresh standby, which takes over.
  t.equal(mig.result?.rollback?.hot, true, 'a replacement standby took over');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);
  const s = await c.status(c.src);
  t.not(s.pid, sb, 'not the killed standby');
  t.same(sourceQemus(c).all, [s.pid], 'exactly one QEMU on the source RAM file');
});

t.test('a source sidecar restarted mid post-copy kills the unused standby and restores once', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const wedged = (await c.status(c.src)).pid;
  const sb = await standbyUp(c);
  await c.killDaemon(c.src);
  await migrating;
  t.ok(qemuAlive(sb), 'the standby outlived the sidecar');
  await assertNotRunningOn(t, c, c.dst);
  await c.restartDaemon(c.src);
  const s = await c.status(c.src);
  t.equal(s.state, 'running', 'VM runs on the source again');
  t.notOk(qemuAlive(sb), 'the standby that never got state was killed');
  t.notOk(qemuAlive(wedged), 'the wedged QEMU was killed');
  t.same(sourceQemus(c).all, [s.pid], 'exactly one QEMU on the source RAM file');
  t.equal(s.lastMigration?.reason, 'sidecar-restart');
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 2, 'after recovery');
  t.same(rep.corrupt, [], 'no CORRUPT after recovery');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT anywhere in the source serial log');
});

t.test('rollback hands the standby the last checkpoint; a second migration completes and kills its standby', async (t) => {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  const wedged = (await c.status(c.src)).pid;
  const sb = await standbyUp(c);
  t.equal((await c.tether(c.src, ['abort', c.vmName])).code, 0, 'abort accepted');
  const mig = await migrating;
  t.equal(mig.result?.rollback?.hot, true, 'the hot standby took over');
  await assertSurvivedOnSource(t, c, mig, (e) => e >= 3);
  const s = await c.status(c.src);
  t.equal(s.pid, sb, "the standby is the VM's QEMU");
  t.notOk(qemuAlive(wedged), 'the wedged QEMU is gone');
  t.same(sourceQemus(c).all, [sb], 'exactly one QEMU on the source RAM file');
  const vmJson = await VmInstance.readPersisted(path.join(c.src.stateDir, c.vmName));
  t.equal(vmJson?.pid, sb, 'vm.json records it');

  c.releaseCompletion();
  const again = await c.migrate();
  t.equal(again.code, 0, `second migration completes: ${again.stderr.slice(-1500)}`);
  t.same(sourceQemus(c).all, [], 'no QEMU left on the source: VM and standby both gone');
  t.same(qemuPidsWith(path.join(c.src.stateDir, c.vmName, 'standby.sock')), [], 'the second standby was killed on completion');
  const rep = await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 2, 'on the destination');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination');
  await c.cleanup(); // its guest would only load the CPU during the next test
});

t.test('a standby leaves the RAM file unchanged until it is handed device state, then runs the VM alone', async (t: Test) => {
  const dir = fs.mkdtempSync('/dev/shm/tether-standby-test-');
  t.teardown(() => {
    for (const pid of qemuPidsWith(dir)) process.kill(pid, 'SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const host = { name: 'h', stateDir: path.join(dir, 'state'), ramDir: path.join(dir, 'ram') } as HostConfig;
  const cfg: VmConfig = {
    name: 'sb',
    qemu: { binary: 'qemu-system-x86_64', accel: 'tcg', machine: 'pc', cpu: 'max', extraArgs: [] },
    memoryMiB: 512,
    cpus: 1,
    kernel: path.join(GUEST, 'vmlinuz'),
    initrd: path.join(GUEST, 'initrd.img'),
    append: 'console=ttyS0 quiet panic=-1 tether.run=memcheck:96:32',
    checkpoint: { intervalMs: 50, failoverTimeoutMs: 8000, fenceTimeoutMs: 4000, dirtyTracker: 'auto', hashThreads: 1, window: 3 },
    migration: { precopyMs: 0, maxBandwidth: 0, hotStandby: true },
  };
  const vm = new VmInstance(host, cfg, nullLogger);
  await vm.boot();
  const first = vm.qemu!;
  await waitPasses(vm.serialLog, 0, 1, 'after boot');
  // The source at switchover: paused, device state saved, the RAM file quiescent.
  await first.qmp.execute('stop');
  const dev = path.join(dir, 'dev0');
  await first.qmp.execute('xen-save-devices-state', { filename: dev, live: false });
  const before = { all: sha(vm.ramFile), low: sha(vm.ramFile, 0, MiB) };

  const sb = HotStandby.start(vm);
  const sbPid = await sb.pid();
  t.ok(sbPid, 'the standby started');
  t.not(sbPid, first.pid, 'a second QEMU');
  // QMP answers from QEMU's main loop, which starts after its whole start-up (machine
  // init and reset): anything it does at start is done by now, however fast or slow.
  t.equal(await sb.status(), 'inmigrate', 'the standby waits, vCPUs not running');
  t.equal(sha(vm.ramFile, 0, MiB), before.low, 'first MiB (real-mode RAM, VGA hole, option-ROM and BIOS shadow) unchanged');
  t.equal(sha(vm.ramFile), before.all, 'whole RAM file unchanged by the standby start');
  t.equal(await sb.status(), 'inmigrate', 'still waiting after the hash');

  // The decision: the old QEMU dies first, then the standby gets the device state.
  await vm.killQemu();
  t.ok(await sb.promote(dev), 'promoted');
  t.equal(vm.qemu!.pid, sbPid, "the standby is the VM's QEMU now");
  t.same(qemuPidsWith(`mem-path=${vm.ramFile},`), [sbPid], 'exactly one QEMU on the RAM file');
  t.equal((await VmInstance.readPersisted(vm.dir))?.pid, sbPid, 'vm.json names it');
  t.ok(fs.statSync(vm.qmpSocket).isSocket(), "its QMP socket is at the VM's path");
  t.notOk(fs.existsSync(standbySocket(vm)), 'and no longer at the standby path');
  t.equal((await vm.qemu!.qmp.execute<{ status: string }>('query-status')).status, 'running');
  const rep = await waitPasses(vm.serialLog, fileSize(vm.serialLog), 2, 'after the promotion');
  t.same(rep.corrupt, [], 'memcheck: no CORRUPT after the promotion');
  t.same(memcheck(vm.serialLog).corrupt, [], 'no CORRUPT anywhere');
  await vm.killQemu();

  // CONTROL: the hash does see start-up writes — a QEMU that boots (no -incoming) over the
  // same file changes it at once (firmware writes its shadow and low RAM).
  const quiet = sha(vm.ramFile);
  const quietLow = shaLow(vm.ramFile);
  const boot = await QemuProcess.start({
    vm: cfg,
    ramFile: vm.ramFile,
    qmpSocket: path.join(dir, 'control.sock'),
    serialLog: path.join(dir, 'control-serial.log'),
    dieWithParent: true,
  });
  // Until the firmware has written low RAM (it runs in the vCPU: no fixed wait fits every machine).
  await waitFor(() => shaLow(vm.ramFile) !== quietLow, 'the booting QEMU writing low RAM', 120_000);
  await boot.qmp.execute('stop');
  t.not(sha(vm.ramFile), quiet, 'CONTROL: a booting QEMU changes the RAM file, and the hash shows it');
  await boot.kill();
});
