/**
 * The destination daemon's answer to `prepare`, over a real peer channel: it runs only
 * what its own vmConfigDir describes, and refuses (typed ABORT, nothing created) an
 * unknown VM, another device model, unsafe timeouts, and a second prepare of a VM
 * that is already incoming.
 */
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { crc32 } from 'node:zlib';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import type { Message } from '../peer/messages.ts';
import { loadVmConfig } from '../config/load.ts';
import type { HostConfig } from '../config/types.ts';
import { PeerChannel } from '../peer/channel.ts';
import { newMigrationId } from '../epoch/id.ts';
import { ignored, nullLogger } from '../util/log.ts';
import { sleep } from '../util/time.ts';
import { deviceModelDigest } from '../vm/device-model.ts';
import { writeCompletingRecord } from '../checkpoint/store.ts';
import { callDaemon } from '../control/client.ts';
import { completingRecordPath } from '../migrate/destination.ts';
import { qemuOptValue } from '../qemu/cmdline.ts';
import { procStartTime } from '../qemu/process.ts';
import { VmInstance } from '../vm/instance.ts';
import { MARKER_VERSION } from '../vm/instance.ts';
import { encodeStateFile } from '../vm/state-file.ts';
import { Daemon } from './daemon.ts';
import { alive, freePort } from './daemon.test-util.ts';

/** Polls `fn`; a wait that never ends fails the test (after 30 s) instead of hanging it. */
async function waitUntil(fn: () => boolean): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error('waited 30 s in vain');
    await sleep(10);
  }
}

interface Fixture {
  dir: string;
  host: HostConfig;
  daemon: Daemon;
  /** Writes <vmConfigDir>/<name>.yaml. */
  writeVm(name: string, extra?: string): string;
}

/** `before` runs once the host config exists, before the daemon starts (and recovers). */
async function destination(t: Test, before?: (host: HostConfig, dir: string) => Promise<void>): Promise<Fixture> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-daemon-'));
  const port = await freePort();
  const host: HostConfig = {
    name: 'host-d',
    stateDir: path.join(dir, 'state'),
    ramDir: path.join(dir, 'ram'),
    controlSocket: path.join(dir, 'control.sock'),
    vmConfigDir: path.join(dir, 'vms'),
    peer: { listen: { host: '127.0.0.1', port }, key: randomBytes(32) },
    migration: { listenHost: '127.0.0.1', portRange: [49152, 49152] },
    logLevel: 'error',
  };
  fs.mkdirSync(host.vmConfigDir);
  await before?.(host, dir);
  const daemon = new Daemon(host, nullLogger, {});
  await daemon.start();
  t.teardown(async () => {
    await daemon.shutdown();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const writeVm = (name: string, extra = ''): string => {
    const file = path.join(host.vmConfigDir, `${name}.yaml`);
    fs.writeFileSync(file, `name: ${name}\nmemoryMiB: 16\nkernel: /nonexistent/vmlinuz\n${extra}`);
    return file;
  };
  return { dir, host, daemon, writeVm };
}

/** Connect as a source and send prepare; resolves with the first message D answers. */
async function prepare(f: Fixture, body: Record<string, unknown>): Promise<{ reply: Message; ch: PeerChannel }> {
  const ch = await PeerChannel.connect('127.0.0.1', f.host.peer.listen.port, { psk: f.host.peer.key });
  const reply = new Promise<Message>((resolve, reject) => {
    ch.on('message', resolve);
    ch.on('close', () => reject(new Error('closed without an answer')));
  });
  ch.start();
  await ch.send({
    type: 'control',
    body: { kind: 'prepare', migrationId: newMigrationId(), sendConfiguration: true, failoverTimeoutMs: 3000, ...body },
  });
  return { reply: await reply, ch };
}

/** What a source with this config sends. */
const digestOf = (file: string): string => deviceModelDigest(loadVmConfig(file));

function assertNothingCreated(t: Test, f: Fixture, vm: string): void {
  t.notOk(f.daemon.vms.has(vm), 'no VM registered');
  t.notOk(fs.existsSync(path.join(f.host.stateDir, vm)), 'no state dir for the VM');
  t.notOk(fs.existsSync(path.join(f.host.ramDir, `${vm}.ram`)), 'no RAM file');
}

t.test('an unknown VM is refused with ERR_PEER_UNKNOWN_VM', async (t) => {
  const f = await destination(t);
  const src = f.writeVm('elsewhere');
  const digest = digestOf(src);
  fs.rmSync(src);
  const { reply } = await prepare(f, { vm: 'elsewhere', deviceModel: digest });
  t.match(reply, { type: 'abort', code: 'ERR_PEER_UNKNOWN_VM' });
  assertNothingCreated(t, f, 'elsewhere');
});

t.test('a file that describes another VM is not taken for the named one', async (t) => {
  const f = await destination(t);
  const file = f.writeVm('vm1');
  fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace('name: vm1', 'name: vm2'));
  const { reply } = await prepare(f, { vm: 'vm1', deviceModel: 'a'.repeat(64) });
  t.match(reply, { type: 'abort', code: 'ERR_PEER_UNKNOWN_VM' });
  assertNothingCreated(t, f, 'vm1');
});

t.test('a different device model is refused with ERR_PEER_DEVICE_MODEL', async (t) => {
  const f = await destination(t);
  const sourceDigest = digestOf(f.writeVm('vm1', 'cpus: 2\n'));
  f.writeVm('vm1', 'cpus: 1\n');
  const { reply } = await prepare(f, { vm: 'vm1', deviceModel: sourceDigest });
  t.match(reply, { type: 'abort', code: 'ERR_PEER_DEVICE_MODEL' });
  assertNothingCreated(t, f, 'vm1');
});

t.test("a fence timeout not below the source's failover timeout is refused", async (t) => {
  const f = await destination(t);
  const file = f.writeVm('vm1', 'checkpoint:\n  failoverTimeoutMs: 9000\n  fenceTimeoutMs: 5000\n');
  const { reply } = await prepare(f, { vm: 'vm1', deviceModel: digestOf(file), failoverTimeoutMs: 5000 });
  t.match(reply, { type: 'abort', code: 'ERR_PEER_TIMEOUTS' });
  assertNothingCreated(t, f, 'vm1');
});

t.test('a name that is not a VM name (a path) is refused before any file is read', async (t) => {
  const f = await destination(t);
  const { reply } = await prepare(f, { vm: '../../etc/passwd', deviceModel: 'a'.repeat(64) });
  t.match(reply, { type: 'abort', code: 'ERR_PEER_CONTROL' });
});

/**
 * An incoming migration of vm1 that stays in its start-up for as long as the test needs:
 * D's own "QEMU" (its config's qemu.binary) records that it was started, then never answers QMP.
 */
async function stuckIncoming(t: Test, f: Fixture, migrationId: string) {
  const fake = path.join(f.dir, 'fake-qemu.sh');
  const pidFile = path.join(f.dir, 'fake-qemu.pid');
  fs.writeFileSync(fake, `#!/bin/sh\necho $$ > ${pidFile}\nexec sleep 60\n`, { mode: 0o755 });
  const file = f.writeVm('vm1', `qemu:\n  binary: ${fake}\n`);
  const digest = digestOf(file);
  const ch = await PeerChannel.connect('127.0.0.1', f.host.peer.listen.port, { psk: f.host.peer.key });
  t.teardown(() => ch.close());
  const received: Message[] = [];
  ch.on('message', (m) => received.push(m));
  ch.start();
  await ch.send({
    type: 'control',
    body: { kind: 'prepare', migrationId, vm: 'vm1', deviceModel: digest, sendConfiguration: true, failoverTimeoutMs: 3000 },
  });
  await waitUntil(() => fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '');
  const fakePid = Number(fs.readFileSync(pidFile, 'utf8'));
  const kill = () => {
    try {
      process.kill(fakePid, 'SIGKILL');
    } catch {
      /* gone */
    }
  };
  t.teardown(kill);
  return { ch, received, digest, pidFile, fakePid, kill };
}

/** A resolve on a channel of its own (as a source's retry sends it); resolves with D's RESOLVED body. */
async function resolveOnOwnChannel(f: Fixture, body: Record<string, unknown>): Promise<Record<string, unknown>> {
  const ch = await PeerChannel.connect('127.0.0.1', f.host.peer.listen.port, { psk: f.host.peer.key });
  try {
    const reply = new Promise<Message>((resolve, reject) => {
      ch.on('message', resolve);
      ch.on('close', () => reject(new Error('closed without an answer')));
    });
    ch.start();
    await ch.send({ type: 'control', body: { kind: 'resolve', vm: 'vm1', ...body } });
    const m = await reply;
    if (m.type !== 'control') throw new Error(`expected RESOLVED, got ${m.type}`);
    return m.body;
  } finally {
    ch.close();
  }
}

t.test('a second prepare of a VM already incoming is refused with ERR_PEER_VM_BUSY', async (t) => {
  const f = await destination(t);
  const first = await stuckIncoming(t, f, newMigrationId());
  const { reply } = await prepare(f, { vm: 'vm1', deviceModel: first.digest });
  t.match(reply, { type: 'abort', code: 'ERR_PEER_VM_BUSY' });
  t.equal(fs.readFileSync(first.pidFile, 'utf8').trim(), String(first.fakePid), 'no second QEMU was started');
  first.kill();
});

t.test('a resolve for another migration of the VM is refused and changes nothing; its own one is acted on', async (t) => {
  const f = await destination(t);
  const current = newMigrationId();
  const stale = newMigrationId(); // an earlier migration of vm1, rolled back; its answer still retried
  const b = await stuckIncoming(t, f, current);
  let fenced = false;
  b.ch.on('close', () => (fenced = true));

  // on a channel of its own, as notifyDestination retries it
  const own = await resolveOnOwnChannel(f, { migrationId: stale, outcome: 'rolled-back', epoch: 4 });
  t.same(own, { kind: 'resolved', migrationId: stale, known: false, code: 'ERR_MIGRATION_ID_MISMATCH' });
  const done = await resolveOnOwnChannel(f, { migrationId: stale, outcome: 'completed', epoch: 9 });
  t.match(done, { known: false, code: 'ERR_MIGRATION_ID_MISMATCH' }, 'nor is a stale completed taken');
  // on the migration channel itself
  await b.ch.send({ type: 'control', body: { kind: 'resolve', migrationId: stale, vm: 'vm1', outcome: 'rolled-back', epoch: 4 } });
  await waitUntil(() => b.received.length > 0);
  t.match(b.received[0], {
    type: 'control',
    body: { kind: 'resolved', migrationId: stale, known: false, code: 'ERR_MIGRATION_ID_MISMATCH' },
  });

  await sleep(100);
  t.notOk(fenced, 'the current migration was not fenced: its channel is open');
  t.ok(alive(b.fakePid), "the current migration's QEMU runs on");
  t.match(f.daemon.metrics.registry.render(), /^tether_stale_resolves_total 3$/m, 'each stale answer counted');

  // the control: the same answer with the current id fences this migration
  const mine = await resolveOnOwnChannel(f, { migrationId: current, outcome: 'rolled-back', epoch: 0 });
  t.same(mine, { kind: 'resolved', migrationId: current, known: true });
  await waitUntil(() => fenced);
  t.pass('the answer naming the current migration fenced it');
});

t.test('with no migration of the VM here, a resolve is unknown', async (t) => {
  const f = await destination(t);
  const r = await resolveOnOwnChannel(f, { migrationId: newMigrationId(), outcome: 'rolled-back', epoch: 1 });
  t.match(r, { kind: 'resolved', known: false, code: 'ERR_NO_MIGRATION' });
  t.notMatch(f.daemon.metrics.registry.render(), /^tether_stale_resolves_total [1-9]/m, 'not counted as stale');
});

t.test("a sidecar restarted during the completion handshake waits for its own migration's answer only", async (t) => {
  const current = newMigrationId();
  const qmpCommands: string[] = [];
  let fakePid = 0;
  let vmDir = '';
  const f = await destination(t, async (host, dir) => {
    // What the dead sidecar left: the VM's record, its marker (format 2, with the id), the
    // completion request it recorded, and its incoming "QEMU" - a process whose command line
    // names the VM's RAM file, with a QMP socket that answers every command.
    const file = path.join(host.vmConfigDir, 'vm1.yaml');
    fs.writeFileSync(file, 'name: vm1\nmemoryMiB: 16\nkernel: /nonexistent/vmlinuz\n');
    const vm = new VmInstance(host, loadVmConfig(file), nullLogger);
    await vm.prepareDirs();
    vmDir = vm.dir;
    const fake = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1e9)', `mem-path=${qemuOptValue(vm.ramFile)},share=on`], {
      argv0: 'qemu-system-x86_64',
      stdio: 'ignore',
    });
    fakePid = fake.pid!;
    t.teardown(() => fake.kill('SIGKILL'));
    const qmp = net.createServer((s) => {
      s.on('error', () => {});
      s.write(JSON.stringify({ QMP: { version: { qemu: { micro: 0, minor: 2, major: 7 }, package: '' }, capabilities: [] } }) + '\r\n');
      let buf = '';
      s.on('data', (d) => {
        buf += d.toString();
        for (let nl = buf.indexOf('\n'); nl !== -1; nl = buf.indexOf('\n')) {
          const cmd = JSON.parse(buf.slice(0, nl)) as { execute: string; id?: unknown };
          buf = buf.slice(nl + 1);
          qmpCommands.push(cmd.execute);
          s.write(JSON.stringify({ return: {}, id: cmd.id }) + '\r\n');
        }
      });
    });
    await new Promise<void>((r) => qmp.listen(vm.qmpSocket, r));
    t.teardown(() => qmp.close());
    const rec = { config: vm.config, sendConfiguration: true, pid: fakePid, startTime: procStartTime(fakePid) };
    fs.writeFileSync(path.join(vm.dir, 'vm.json'), encodeStateFile('TETHER-VM', rec));
    const marker = {
      role: 'destination',
      migrationId: current,
      qemuPid: fakePid,
      qemuStartTime: procStartTime(fakePid),
      peer: '127.0.0.1:1',
      startedAt: new Date().toISOString(),
    };
    fs.writeFileSync(path.join(vm.dir, 'migration.json'), encodeStateFile('TETHER-MIGRATION', marker, MARKER_VERSION));
    await writeCompletingRecord(completingRecordPath(vm), 5);
  });
  const status = async () => (await callDaemon(f.host.controlSocket, 'status', { vm: 'vm1' })) as Record<string, any>;
  await f.daemon.recovered;
  t.match(await status(), { state: 'migrating-in', migration: { role: 'destination', id: current, phase: 'completing', finalEpoch: 5 } });
  t.same(qmpCommands, ['qmp_capabilities', 'stop'], 'adopted and paused');

  const stale = newMigrationId();
  for (const answer of [
    { outcome: 'rolled-back', epoch: 2 },
    { outcome: 'completed', epoch: 5 }, // even the right final epoch: the id decides
  ]) {
    const r = await resolveOnOwnChannel(f, { migrationId: stale, ...answer });
    t.same(r, { kind: 'resolved', migrationId: stale, known: false, code: 'ERR_MIGRATION_ID_MISMATCH' }, `stale ${answer.outcome}`);
  }
  await sleep(100);
  t.match(await status(), { state: 'migrating-in', migration: { id: current } }, 'still waiting for its own answer');
  t.same(qmpCommands, ['qmp_capabilities', 'stop'], 'the guest was neither resumed nor killed');
  t.ok(alive(fakePid), 'its QEMU runs on');
  t.ok(fs.existsSync(path.join(vmDir, 'completing.json')), 'the completion request is still recorded');
  t.match(f.daemon.metrics.registry.render(), /^tether_stale_resolves_total 2$/m);

  // the control: its own answer is acted on
  const mine = await resolveOnOwnChannel(f, { migrationId: current, outcome: 'completed', epoch: 5 });
  t.same(mine, { kind: 'resolved', migrationId: current, known: true });
  await waitUntil(() => qmpCommands.includes('cont'));
  t.pass('the answer naming its migration resumed the guest');
});

t.test('tether abort --migration stops only the migration it names', async (t) => {
  const f = await destination(t);
  const current = newMigrationId();
  const b = await stuckIncoming(t, f, current);
  let fenced = false;
  b.ch.on('close', () => (fenced = true));
  const abort = (params: Record<string, unknown>) => callDaemon(f.host.controlSocket, 'abort', { vm: 'vm1', ...params });
  await t.rejects(abort({ migration: newMigrationId() }), { code: 'ERR_MIGRATION_ID_MISMATCH' }, 'another migration of the VM');
  await t.rejects(abort({ migration: 'vm1' }), { code: 'ERR_USAGE' }, 'not a migration id');
  await sleep(100);
  t.notOk(fenced, 'nothing aborted');
  t.same(await abort({ migration: current }), { aborted: 'vm1', role: 'destination', migrationId: current });
  await waitUntil(() => fenced);
});

// ---- recovery after a sidecar restart: what a dead sidecar left, then a new one's start ----

interface FakeQemu {
  pid: number;
  /** QMP commands the fake received, in order. */
  commands: string[];
  /** What query-status answers (cont makes it 'running'). */
  status: string;
}

/**
 * A stand-in for a QEMU the dead sidecar left: a process (whose command line names the VM's RAM
 * file as a real QEMU's does, or a forger's) and, unless `qmp` is false, a QMP socket at the
 * VM's path that answers every command (`qmp: 'silent'`: accepts and never says a word).
 */
async function fakeQemu(t: Test, vm: VmInstance, qmp: boolean | 'silent' = true, status = 'running'): Promise<FakeQemu> {
  const fake = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1e9)', `mem-path=${qemuOptValue(vm.ramFile)},share=on`], {
    argv0: 'qemu-system-x86_64',
    stdio: 'ignore',
  });
  t.teardown(() => fake.kill('SIGKILL'));
  const f: FakeQemu = { pid: fake.pid!, commands: [], status };
  await waitUntil(() => procStartTime(f.pid) !== null);
  if (qmp === false) return f;
  await vm.prepareDirs();
  const srv = net.createServer((s) => {
    s.on('error', () => {});
    if (qmp === 'silent') return;
    s.write(JSON.stringify({ QMP: { version: { qemu: { micro: 0, minor: 2, major: 7 }, package: '' }, capabilities: [] } }) + '\r\n');
    let buf = '';
    s.on('data', (d) => {
      buf += d.toString();
      for (let nl = buf.indexOf('\n'); nl !== -1; nl = buf.indexOf('\n')) {
        const cmd = JSON.parse(buf.slice(0, nl)) as { execute: string; id?: unknown };
        buf = buf.slice(nl + 1);
        f.commands.push(cmd.execute);
        if (cmd.execute === 'cont') f.status = 'running';
        if (cmd.execute === 'stop') f.status = 'paused';
        const ret = cmd.execute === 'query-status' ? { status: f.status, running: f.status === 'running' } : {};
        s.write(JSON.stringify({ return: ret, id: cmd.id }) + '\r\n');
      }
    });
  });
  await new Promise<void>((r) => srv.listen(vm.qmpSocket, r));
  t.teardown(() => srv.close());
  return f;
}

/** The records a dead sidecar left for VM `name`: vm.json naming `qemu` (or none), and a marker. */
async function leftRecords(
  host: HostConfig,
  name: string,
  o: {
    qemu?: { pid: number; startTime: string | null } | null;
    sendConfiguration?: boolean;
    marker?: { role: 'source' | 'destination'; qemu: { pid: number; startTime: string | null } | null };
  },
): Promise<VmInstance> {
  const file = path.join(host.vmConfigDir, `${name}.yaml`);
  fs.writeFileSync(file, `name: ${name}\nmemoryMiB: 16\nkernel: /nonexistent/vmlinuz\n`);
  const vm = new VmInstance(host, loadVmConfig(file), nullLogger);
  await vm.prepareDirs();
  const rec = {
    config: vm.config,
    sendConfiguration: o.sendConfiguration ?? true,
    pid: o.qemu?.pid ?? null,
    startTime: o.qemu?.startTime ?? null,
  };
  fs.writeFileSync(path.join(vm.dir, 'vm.json'), encodeStateFile('TETHER-VM', rec));
  if (o.marker) {
    const m = {
      role: o.marker.role,
      migrationId: newMigrationId(),
      qemuPid: o.marker.qemu?.pid ?? null,
      qemuStartTime: o.marker.qemu?.startTime ?? null,
      peer: '127.0.0.1:1',
      startedAt: new Date().toISOString(),
    };
    fs.writeFileSync(path.join(vm.dir, 'migration.json'), encodeStateFile('TETHER-MIGRATION', m, MARKER_VERSION));
  }
  return vm;
}

/** A second sidecar over the same host (the first one shut down): a restart. */
async function restart(t: Test, f: Fixture): Promise<Daemon> {
  await f.daemon.shutdown();
  const d = new Daemon(f.host, nullLogger, {});
  await d.start();
  t.teardown(() => d.shutdown());
  await d.recovered;
  return d;
}

const statusOf = async (f: Fixture, vm: string) => (await callDaemon(f.host.controlSocket, 'status', { vm })) as Record<string, any>;

t.test('a forged command line or a reused pid is neither killed (fence) nor adopted', async (t) => {
  let forgedFence: FakeQemu | undefined;
  let forgedAdopt: FakeQemu | undefined;
  const f = await destination(t, async (host) => {
    // vm1: an incoming migration interrupted before its QEMU was recorded; a forger's process
    // names vm1's RAM file. vm2: vm.json names pid P, but P is now another (forged) process.
    const vm1 = await leftRecords(host, 'vm1', {});
    forgedFence = await fakeQemu(t, vm1, false);
    // ... and took the pid the marker names (its start time differs)
    const other = { pid: forgedFence.pid, startTime: String(Number(procStartTime(forgedFence.pid)) - 1) };
    await leftRecords(host, 'vm1', { qemu: other, marker: { role: 'destination', qemu: other } });
    const vm2 = await leftRecords(host, 'vm2', {});
    forgedAdopt = await fakeQemu(t, vm2, true);
    const real = procStartTime(forgedAdopt.pid)!;
    await leftRecords(host, 'vm2', { qemu: { pid: forgedAdopt.pid, startTime: String(Number(real) - 1) } });
  });
  await f.daemon.recovered;
  t.ok(alive(forgedFence!.pid), 'the forged process on vm1 was not killed');
  t.match(await statusOf(f, 'vm1'), { state: 'fenced', pid: null });
  t.ok(alive(forgedAdopt!.pid), 'the process that reused vm2 QEMU pid was not killed');
  t.same(forgedAdopt!.commands, [], 'nor spoken to over QMP');
  t.match(await statusOf(f, 'vm2'), { state: 'stopped', pid: null }, 'vm2 is not taken for running');
});

t.test('a failed recovery leaves the VM unrecovered across restarts until the operator resolves it', async (t) => {
  let qemu: FakeQemu | undefined;
  const f = await destination(t, async (host) => {
    // a source past nothing: marker, no checkpoint, its QEMU recorded but its QMP silent
    const vm = await leftRecords(host, 'vm1', {});
    qemu = await fakeQemu(t, vm, 'silent');
    const id = { pid: qemu.pid, startTime: procStartTime(qemu.pid) };
    await leftRecords(host, 'vm1', { qemu: id, marker: { role: 'source', qemu: id } });
  });
  await f.daemon.recovered;
  const st = await statusOf(f, 'vm1');
  t.match(st, { state: 'unrecovered', unrecovered: { code: 'ERR_QEMU_ADOPT' } }, 'unrecovered, with its cause');
  t.ok(alive(qemu!.pid), 'its QEMU was left as it was');
  const file = f.writeVm('vm1');
  await t.rejects(callDaemon(f.host.controlSocket, 'vm.start', { config: file }), { code: 'ERR_VM_UNRECOVERED' });
  await t.rejects(callDaemon(f.host.controlSocket, 'vm.stop', { vm: 'vm1' }), { code: 'ERR_VM_UNRECOVERED' });
  await t.rejects(callDaemon(f.host.controlSocket, 'migrate', { vm: 'vm1', to: '127.0.0.1:1' }), { code: 'ERR_VM_UNRECOVERED' });
  const { reply } = await prepare(f, { vm: 'vm1', deviceModel: digestOf(file) });
  t.match(reply, { type: 'abort', code: 'ERR_VM_UNRECOVERED' }, 'an incoming migration of it is refused');

  // a restart keeps it unrecovered, with the same cause, and still touches nothing
  const d2 = await restart(t, f);
  const f2 = { ...f, daemon: d2 };
  t.match(await statusOf(f2, 'vm1'), { state: 'unrecovered', unrecovered: { code: 'ERR_QEMU_ADOPT' } }, 'still unrecovered');
  t.ok(alive(qemu!.pid));
  await t.rejects(callDaemon(f.host.controlSocket, 'vm.start', { config: file }), { code: 'ERR_VM_UNRECOVERED' });

  // forget is refused while the QEMU it started runs; --force leaves that QEMU running
  await t.rejects(callDaemon(f.host.controlSocket, 'vm.forget', { vm: 'vm1' }), {
    code: 'ERR_VM_QEMU_ALIVE',
    details: { pids: [qemu!.pid] },
  });
  t.same(await callDaemon(f.host.controlSocket, 'vm.forget', { vm: 'vm1', force: true }), {
    vm: 'vm1',
    forgotten: true,
    leftRunning: [qemu!.pid],
  });
  t.ok(alive(qemu!.pid), 'forget signals no process');
  await t.rejects(statusOf(f2, 'vm1'), { code: 'ERR_NO_SUCH_VM' });
  t.notOk(fs.existsSync(path.join(f.host.stateDir, 'vm1', 'vm.json')), 'its records are gone');
});

t.test('tether vm adopt: the operator accepts the one QEMU the records name', async (t) => {
  let qemu: FakeQemu | undefined;
  const f = await destination(t, async (host) => {
    // a vm.json of an older build: a pid without start time is never taken by itself
    const vm = await leftRecords(host, 'vm1', {});
    qemu = await fakeQemu(t, vm, true, 'paused');
    await leftRecords(host, 'vm1', { qemu: { pid: qemu.pid, startTime: null } });
  });
  await f.daemon.recovered;
  t.match(await statusOf(f, 'vm1'), { state: 'unrecovered', unrecovered: { code: 'ERR_RECOVERY' } });
  t.same(qemu!.commands, [], 'not spoken to before the operator decided');
  const r = (await callDaemon(f.host.controlSocket, 'vm.adopt', { vm: 'vm1' })) as Record<string, unknown>;
  t.match(r, { state: 'running', adopted: qemu!.pid, resumed: true });
  t.ok(qemu!.commands.includes('cont') && qemu!.commands.includes('announce-self'), 'resumed and announced');
  const d2 = await restart(t, f);
  t.match(await statusOf({ ...f, daemon: d2 }, 'vm1'), { state: 'running', pid: qemu!.pid }, 'a restart adopts it as usual');
});

t.test('a restored QEMU found paused after a restart is resumed and announced, never shown running while paused', async (t) => {
  let restored: FakeQemu | undefined;
  const f = await destination(t, async (host) => {
    // a rollback had restored the VM into a new QEMU (recorded, paused awaiting its NICs
    // and cont) when the sidecar died; the wedged QEMU the marker names is gone
    const vm = await leftRecords(host, 'vm1', {});
    restored = await fakeQemu(t, vm, true, 'paused');
    await leftRecords(host, 'vm1', {
      qemu: { pid: restored.pid, startTime: procStartTime(restored.pid) },
      sendConfiguration: false,
      marker: { role: 'source', qemu: { pid: 999_999, startTime: '1' } },
    });
  });
  await f.daemon.recovered;
  t.match(await statusOf(f, 'vm1'), { state: 'running', pid: restored!.pid });
  t.equal(restored!.status, 'running', 'its QEMU runs');
  const cont = restored!.commands.indexOf('cont');
  t.ok(cont > 0 && restored!.commands.indexOf('announce-self') > cont, 'cont, then the MAC announcement');
  t.notOk(fs.existsSync(path.join(f.host.stateDir, 'vm1', 'migration.json')), 'the marker is cleared');
});

t.test('recovery runs per VM in parallel with the control socket open: a stuck VM holds no other', async (t) => {
  let stuck: FakeQemu | undefined;
  let fine: FakeQemu | undefined;
  const f = await destination(t, async (host) => {
    // vm-a's QMP socket accepts and never answers; vm-b's QEMU answers at once
    const a = await leftRecords(host, 'vm-a', {});
    stuck = await fakeQemu(t, a, 'silent');
    await leftRecords(host, 'vm-a', { qemu: { pid: stuck.pid, startTime: procStartTime(stuck.pid) } });
    const b = await leftRecords(host, 'vm-b', {});
    fine = await fakeQemu(t, b, true);
    await leftRecords(host, 'vm-b', { qemu: { pid: fine.pid, startTime: procStartTime(fine.pid) } });
  });
  let aDone = false;
  void Promise.resolve(f.daemon.recovered).then(() => (aDone = true));
  // the daemon serves while vm-a is still being recovered
  const b = await (async () => {
    for (;;) {
      const st = await statusOf(f, 'vm-b');
      if (st.state !== 'recovering') return st;
      await sleep(10);
    }
  })();
  t.match(b, { state: 'running', pid: fine!.pid }, 'vm-b recovered');
  t.notOk(aDone, 'while vm-a was still being recovered');
  t.match(await statusOf(f, 'vm-a'), { state: 'recovering' }, 'status shows it');
  await t.rejects(callDaemon(f.host.controlSocket, 'vm.stop', { vm: 'vm-a' }), { code: 'ERR_VM_RECOVERING' });
  const file = f.writeVm('vm-a');
  const { reply } = await prepare(f, { vm: 'vm-a', deviceModel: digestOf(file) });
  t.match(reply, { type: 'abort', code: 'ERR_VM_RECOVERING' }, 'an incoming migration of it is refused');
  await f.daemon.recovered;
  t.match(await statusOf(f, 'vm-a'), { state: 'unrecovered', unrecovered: { code: 'ERR_QEMU_ADOPT' } });
  t.ok(alive(stuck!.pid), 'the stuck QEMU is left as it was');
});

/**
 * Runs this host's sidecar as a process of its own (the daemon's own code, faults from
 * TETHER_FAULTS as in production) so that a fault switch may SIGKILL it; resolves once it
 * serves its control socket.
 */
async function sidecarProcess(t: Test, host: HostConfig, faults: string): Promise<ChildProcess> {
  const script = path.join(path.dirname(host.stateDir), 'sidecar.mts');
  const daemonTs = fileURLToPath(new URL('./daemon.ts', import.meta.url));
  const logTs = fileURLToPath(new URL('../util/log.ts', import.meta.url));
  fs.writeFileSync(
    script,
    `import { Daemon } from ${JSON.stringify(daemonTs)};\nimport { nullLogger } from ${JSON.stringify(logTs)};\n` +
      `const h = JSON.parse(process.env.TETHER_TEST_HOST);\nh.peer.key = Buffer.from(h.peer.key, 'hex');\n` +
      `await new Daemon(h, nullLogger).start();\n`,
  );
  const child = spawn(process.execPath, ['--import', 'tsx', script], {
    env: {
      ...process.env,
      TETHER_FAULTS: faults,
      TETHER_TEST_HOST: JSON.stringify({ ...host, peer: { ...host.peer, key: host.peer.key.toString('hex') } }),
    },
    stdio: 'ignore',
  });
  t.teardown(() => child.kill('SIGKILL'));
  await waitUntil(() => fs.existsSync(host.controlSocket));
  return child;
}

for (const step of [1, 2]) {
  t.test(
    `destination: a sidecar that dies at step ${step} of dropping the completion records never fences the VM at its restart`,
    async (t) => {
      let qemu: FakeQemu | undefined;
      const f = await destination(t, async (host) => {
        // What a sidecar restarted in the completion handshake finds: marker, completion request, its paused QEMU.
        const vm = await leftRecords(host, 'vm1', {});
        qemu = await fakeQemu(t, vm, true);
        const id = { pid: qemu.pid, startTime: procStartTime(qemu.pid) };
        const rec = await leftRecords(host, 'vm1', { qemu: id, marker: { role: 'destination', qemu: id } });
        await writeCompletingRecord(completingRecordPath(rec), 5);
        const migrationId = (await VmInstance.readMarker(rec.dir))!.migrationId;
        // That sidecar waits for the source's answer, acts on it (the VM runs here, S drops its
        // copy) and dies at `step` of dropping its records.
        const child = await sidecarProcess(t, host, `crash-cleanup-step=${step}`);
        const exited = new Promise((r) => child.once('exit', r));
        await waitUntil(() => qemu!.commands.includes('stop'));
        const ch = await PeerChannel.connect('127.0.0.1', host.peer.listen.port, { psk: host.peer.key });
        ch.start();
        await ch.send({ type: 'control', body: { kind: 'resolve', vm: 'vm1', migrationId, outcome: 'completed', epoch: 5 } });
        await exited;
        ch.close();
        t.equal(qemu!.status, 'running', 'the VM ran here before the sidecar died');
        fs.rmSync(host.controlSocket, { force: true });
      });
      // the restart (the fixture's daemon) over what the dead sidecar left
      await f.daemon.recovered;
      t.ok(alive(qemu!.pid), 'the only running copy was not killed');
      t.match(await statusOf(f, 'vm1'), { state: 'running', pid: qemu!.pid });
      t.equal(qemu!.status, 'running', 'nor paused');
    },
  );
}

for (const step of [1, 2, 3]) {
  t.test(`source: a sidecar that dies at step ${step} of dropping its records after a completion never lists the VM again`, async (t) => {
    const f = await destination(t, async (host) => {
      // What a source sidecar restarted after recording completion finds: vm.json (its QEMU gone),
      // the marker naming D, completed.json. D is this test: it confirms the answer.
      const migrationId = newMigrationId();
      const d = net.createServer((sock) => {
        sock.on('error', () => {});
        void PeerChannel.accept(sock, { psk: host.peer.key }).then(
          (ch) => {
            ch.on('message', (m) => {
              if (m.type === 'control' && m.body.kind === 'resolve') {
                void ch
                  .send({ type: 'control', body: { kind: 'resolved', migrationId: m.body.migrationId, known: true } })
                  .catch(ignored(nullLogger, 'the sidecar under test may close first'));
              }
            });
            ch.start();
          },
          ignored(nullLogger, 'a handshake the dying sidecar did not finish'),
        );
      });
      await new Promise<void>((r) => d.listen(0, '127.0.0.1', r));
      t.teardown(() => d.close());
      const vm = await leftRecords(host, 'vm1', { marker: { role: 'source', qemu: null } });
      const m = (await VmInstance.readMarker(vm.dir))!;
      const marker = { ...m, migrationId, peer: `127.0.0.1:${(d.address() as net.AddressInfo).port}` };
      fs.writeFileSync(path.join(vm.dir, 'migration.json'), encodeStateFile('TETHER-MIGRATION', marker, MARKER_VERSION));
      fs.mkdirSync(vm.checkpointDir, { recursive: true });
      const body = JSON.stringify({ format: 'tether-completed', version: 1, epoch: 5 });
      fs.writeFileSync(path.join(vm.checkpointDir, 'completed.json'), `${body.slice(0, -1)},"crc32":${crc32(Buffer.from(body))}}\n`);
      const child = await sidecarProcess(t, host, `crash-cleanup-step=${step}`);
      await new Promise((r) => child.once('exit', r));
      fs.rmSync(host.controlSocket, { force: true });
    });
    await f.daemon.recovered;
    // the VM runs on D: this host must neither list it (stopped, bootable) nor try to recover it
    await t.rejects(statusOf(f, 'vm1'), { code: 'ERR_NO_SUCH_VM' });
  });
}
