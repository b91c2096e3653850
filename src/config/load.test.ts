import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadHostConfig, loadVmConfig, parseHostConfig, parseVmConfig } from './load.ts';
import { isTetherError } from '../errors.ts';
import { gateDefaults, gateMinimum, gateReserve } from '../gate/reserve.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const configsDir = path.resolve(here, '../../configs');
const KEY32 = Buffer.alloc(32, 7);
const KEY_B64 = KEY32.toString('base64');
const base = { baseDir: '/etc/tether' };

function tmpdir(t: { teardown(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-cfg-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function err(fn: () => unknown): { code: string; field?: unknown; message: string; details?: Record<string, unknown> } {
  try {
    fn();
  } catch (e) {
    if (isTetherError(e)) return { code: e.code, field: e.details?.['field'], message: e.message, details: e.details };
    throw e;
  }
  throw new Error('expected an error');
}

function minimalHost(): Record<string, unknown> {
  return { name: 'a', stateDir: 'state', peer: { listen: '10.0.0.1:7700', key: KEY_B64 } };
}

function minimalVm(): Record<string, unknown> {
  return { name: 'vm1', memoryMiB: 512, kernel: 'k/vmlinuz' };
}

/** Deep-set a dotted path in a fresh copy. */
function withField(obj: Record<string, unknown>, field: string, value: unknown): Record<string, unknown> {
  const copy = structuredClone(obj);
  const parts = field.split('.');
  let cur = copy;
  for (const p of parts.slice(0, -1)) {
    cur[p] ??= {};
    cur = cur[p] as Record<string, unknown>;
  }
  const last = parts[parts.length - 1]!;
  if (value === undefined) delete cur[last];
  else cur[last] = value;
  return copy;
}

t.test('example configs load', async (t) => {
  const a = loadHostConfig(path.join(configsDir, 'host-a.yaml'));
  t.equal(a.name, 'host-a');
  t.equal(a.stateDir, path.resolve(configsDir, '../.cache/state/host-a'));
  t.same(a.peer.listen, { host: '10.10.0.1', port: 7700 });
  t.ok(a.peer.key.length >= 32);
  t.same(a.migration, { listenHost: '10.10.0.1', portRange: [49152, 49215] });
  t.same(a.metrics, { host: '127.0.0.1', port: 9701 });
  const b = loadHostConfig(path.join(configsDir, 'host-b.yaml'));
  t.equal(b.name, 'host-b');
  t.ok(b.peer.key.equals(a.peer.key), 'both example hosts share the key');

  const vm = loadVmConfig(path.join(configsDir, 'vm-example.yaml'));
  t.same(vm, {
    name: 'vm1',
    qemu: { binary: 'qemu-system-x86_64', accel: 'tcg', machine: 'pc', cpu: 'max', extraArgs: [] },
    memoryMiB: 512,
    cpus: 1,
    kernel: path.resolve(configsDir, '../.cache/guest/current/vmlinuz'),
    initrd: path.resolve(configsDir, '../.cache/guest/current/initrd.img'),
    append: 'console=ttyS0 quiet panic=-1 tether.run=memcheck:256',
    checkpoint: {
      intervalMs: 50,
      failoverTimeoutMs: 3000,
      fenceTimeoutMs: 1500,
      dirtyTracker: 'auto',
      hashThreads: Math.max(1, Math.floor(os.availableParallelism() / 2)),
      window: 3,
    },
    disk: { image: '/srv/shared/vm1.img', journalMaxBytes: 268435456, journalSegmentBytes: 134217728, reconnectDelaySec: 30 },
    migration: { precopyMs: 0, maxBandwidth: 0, hotStandby: true },
    nics: [{ mac: '52:54:00:12:34:56', bridge: 'br-guest', tap: 'tap-vm1-0' }],
    gate: { maxBytes: 16777216, maxFrames: 32768 },
  });
});

t.test('host defaults', async (t) => {
  const h = parseHostConfig(minimalHost(), base);
  t.same(h, {
    name: 'a',
    stateDir: '/etc/tether/state',
    ramDir: '/dev/shm/tether/a',
    controlSocket: '/etc/tether/state/control.sock',
    vmConfigDir: '/etc/tether/vms',
    journalDir: '/etc/tether/state/journal',
    peer: { listen: { host: '10.0.0.1', port: 7700 }, key: KEY32, handshakeTimeoutMs: 3000, maxUnauthenticated: 16 },
    migration: { listenHost: '10.0.0.1', portRange: [49152, 49215] },
    logLevel: 'info',
  });
  t.notOk('metrics' in h);
});

t.test('host: explicit values, IPv6, null means default', async (t) => {
  const h = parseHostConfig(
    {
      ...minimalHost(),
      ramDir: 'ram',
      controlSocket: '/run/t.sock',
      vmConfigDir: 'vms',
      journalDir: '/var/lib/tether/journal',
      peer: { listen: '[fd00::1]:7700', key: KEY_B64, handshakeTimeoutMs: 500, maxUnauthenticated: 2 },
      migration: { listenHost: 'fd00::1', portRange: [50000, 50000] },
      metrics: 'localhost:9100',
      logLevel: null,
    },
    base,
  );
  t.equal(h.ramDir, '/etc/tether/ram');
  t.equal(h.controlSocket, '/run/t.sock');
  t.equal(h.vmConfigDir, '/etc/tether/vms', 'relative to the file');
  t.equal(h.journalDir, '/var/lib/tether/journal');
  t.same(h.peer.listen, { host: 'fd00::1', port: 7700 });
  t.equal(h.peer.handshakeTimeoutMs, 500);
  t.equal(h.peer.maxUnauthenticated, 2);
  t.same(h.migration.portRange, [50000, 50000]);
  t.same(h.metrics, { host: 'localhost', port: 9100 });
  t.equal(h.logLevel, 'info');
});

t.test('host: peer.keyFile raw bytes and base64 text, relative to baseDir', async (t) => {
  const dir = tmpdir(t);
  const raw = Buffer.from(Array.from({ length: 40 }, (_, i) => (i * 37) & 0xff));
  fs.writeFileSync(path.join(dir, 'raw.key'), raw, { mode: 0o600 });
  fs.writeFileSync(path.join(dir, 'b64.key'), `${KEY32.toString('base64')}\n`, { mode: 0o600 });
  const mk = (keyFile: string): Record<string, unknown> => ({ ...minimalHost(), peer: { listen: '1.2.3.4:1', keyFile } });
  t.ok(parseHostConfig(mk('raw.key'), { baseDir: dir }).peer.key.equals(raw));
  t.ok(parseHostConfig(mk('b64.key'), { baseDir: dir }).peer.key.equals(KEY32));

  fs.writeFileSync(path.join(dir, 'short.key'), Buffer.alloc(31, 1), { mode: 0o600 });
  t.match(
    err(() => parseHostConfig(mk('short.key'), { baseDir: dir })),
    { code: 'ERR_CONFIG_INVALID', field: 'peer.keyFile' },
  );
  fs.writeFileSync(path.join(dir, 'shortb64.key'), Buffer.alloc(20, 1).toString('base64'), { mode: 0o600 });
  t.match(
    err(() => parseHostConfig(mk('shortb64.key'), { baseDir: dir })),
    { code: 'ERR_CONFIG_INVALID', field: 'peer.keyFile' },
  );
  t.match(
    err(() => parseHostConfig(mk('missing.key'), { baseDir: dir })),
    { code: 'ERR_CONFIG_READ', field: 'peer.keyFile' },
  );
});

t.test('host: a key file that group or others may read or write is refused, like ssh', async (t) => {
  const dir = tmpdir(t);
  const file = path.join(dir, 'peer.key');
  fs.writeFileSync(file, `${KEY32.toString('base64')}\n`);
  const mk = (): Record<string, unknown> => ({ ...minimalHost(), peer: { listen: '1.2.3.4:1', keyFile: 'peer.key' } });
  for (const mode of [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o666, 0o777, 0o610, 0o601]) {
    fs.chmodSync(file, mode);
    t.match(
      err(() => parseHostConfig(mk(), { baseDir: dir })),
      { code: 'ERR_CONFIG_KEY_MODE', field: 'peer.keyFile' },
      `mode 0${mode.toString(8)} refused`,
    );
  }
  for (const mode of [0o600, 0o400]) {
    fs.chmodSync(file, mode);
    t.ok(parseHostConfig(mk(), { baseDir: dir }).peer.key.equals(KEY32), `mode 0${mode.toString(8)} accepted`);
  }
  // through the file entry point too: the error keeps its code and field
  fs.chmodSync(file, 0o644);
  const yaml = path.join(dir, 'host.yaml');
  fs.writeFileSync(yaml, 'name: h\nstateDir: ./state\npeer:\n  listen: "127.0.0.1:7000"\n  keyFile: peer.key\n');
  t.match(
    err(() => loadHostConfig(yaml)),
    { code: 'ERR_CONFIG_KEY_MODE', field: 'peer.keyFile' },
  );
  // someone else's key file, even 0600 (root may chown it; elsewhere the check cannot be staged)
  if (process.geteuid?.() === 0) {
    fs.chmodSync(file, 0o600);
    fs.chownSync(file, 1001, 1001);
    t.match(
      err(() => parseHostConfig(mk(), { baseDir: dir })),
      { code: 'ERR_CONFIG_KEY_MODE', field: 'peer.keyFile' },
    );
    fs.chownSync(file, 0, 0);
    t.ok(parseHostConfig(mk(), { baseDir: dir }).peer.key.equals(KEY32), "root's own key file accepted");
  }
});

t.test('host: bad fields', async (t) => {
  const cases: Array<[string, unknown, string]> = [
    ['name', undefined, 'name'],
    ['name', '', 'name'],
    ['name', 'has space', 'name'],
    ['name', 'a/b', 'name'],
    ['name', 42, 'name'],
    ['stateDir', undefined, 'stateDir'],
    ['stateDir', ['x'], 'stateDir'],
    ['ramDir', 5, 'ramDir'],
    ['controlSocket', `/${'x'.repeat(120)}.sock`, 'controlSocket'],
    ['stateDir', `/${'s'.repeat(100)}`, 'controlSocket'], // default socket path gets too long
    ['peer', undefined, 'peer'],
    ['peer', 'x', 'peer'],
    ['peer.listen', undefined, 'peer.listen'],
    ['peer.listen', 7700, 'peer.listen'],
    ['peer.listen', 'nohost', 'peer.listen'],
    ['peer.listen', 'h:0', 'peer.listen'],
    ['peer.listen', 'h:65536', 'peer.listen'],
    ['peer.listen', 'h:12x', 'peer.listen'],
    ['peer.listen', 'fd00::1:7700', 'peer.listen'],
    ['peer.key', undefined, 'peer'],
    ['peer.key', 'not base64!', 'peer.key'],
    ['peer.key', Buffer.alloc(31).toString('base64'), 'peer.key'],
    ['peer.keyFile', 'k', 'peer'], // both key and keyFile
    ['peer.extra', 1, 'peer.extra'],
    ['peer.handshakeTimeoutMs', 99, 'peer.handshakeTimeoutMs'],
    ['peer.handshakeTimeoutMs', 60_001, 'peer.handshakeTimeoutMs'],
    ['peer.handshakeTimeoutMs', 1.5e3 + 0.5, 'peer.handshakeTimeoutMs'],
    ['peer.handshakeTimeoutMs', '3000', 'peer.handshakeTimeoutMs'],
    ['peer.maxUnauthenticated', 0, 'peer.maxUnauthenticated'],
    ['peer.maxUnauthenticated', 1025, 'peer.maxUnauthenticated'],
    ['peer.maxUnauthenticated', -1, 'peer.maxUnauthenticated'],
    ['migration', [], 'migration'],
    ['migration.portRange', [1], 'migration.portRange'],
    ['migration.portRange', [2, 1], 'migration.portRange'],
    ['migration.portRange', [0, 10], 'migration.portRange[0]'],
    ['migration.portRange', [1, 70000], 'migration.portRange[1]'],
    ['migration.portRange', [1.5, 10], 'migration.portRange[0]'],
    ['migration.portRange', '1-10', 'migration.portRange'],
    ['migration.listenHost', 3, 'migration.listenHost'],
    ['migration.bogus', 3, 'migration.bogus'],
    ['metrics', 9100, 'metrics'],
    ['metrics', ':9100', 'metrics'],
    ['logLevel', 'verbose', 'logLevel'],
    ['logLevel', 1, 'logLevel'],
    ['unknownTopLevel', true, 'unknownTopLevel'],
  ];
  for (const [field, value, expectField] of cases) {
    const e = err(() => parseHostConfig(withField(minimalHost(), field, value), base));
    t.equal(e.code, 'ERR_CONFIG_INVALID', `${field}=${JSON.stringify(value)}`);
    t.equal(e.field, expectField, `${field}=${JSON.stringify(value)} names ${expectField}`);
    t.ok(e.message.startsWith(`${expectField}: `), `message names the field: ${e.message}`);
  }
  // wildcard listen needs an explicit migration.listenHost
  const e = err(() => parseHostConfig(withField(minimalHost(), 'peer.listen', '0.0.0.0:7700'), base));
  t.match(e, { code: 'ERR_CONFIG_INVALID', field: 'migration.listenHost' });
  t.equal(
    parseHostConfig(withField(withField(minimalHost(), 'peer.listen', '0.0.0.0:7700'), 'migration.listenHost', '10.1.1.1'), base).migration
      .listenHost,
    '10.1.1.1',
  );
});

t.test('root must be a mapping', async (t) => {
  for (const v of [null, undefined, 'x', 1, []]) {
    t.match(
      err(() => parseHostConfig(v, base)),
      { code: 'ERR_CONFIG_INVALID', field: '' },
    );
    t.match(
      err(() => parseVmConfig(v, base)),
      { code: 'ERR_CONFIG_INVALID', field: '' },
    );
  }
});

t.test('vm defaults', async (t) => {
  t.same(parseVmConfig(minimalVm(), base), {
    name: 'vm1',
    qemu: { binary: 'qemu-system-x86_64', accel: 'tcg', machine: 'pc', cpu: 'max', extraArgs: [] },
    memoryMiB: 512,
    cpus: 1,
    kernel: '/etc/tether/k/vmlinuz',
    append: '',
    checkpoint: {
      intervalMs: 50,
      failoverTimeoutMs: 3000,
      fenceTimeoutMs: 1500,
      dirtyTracker: 'auto',
      hashThreads: Math.max(1, Math.floor(os.availableParallelism() / 2)),
      window: 3,
    },
    migration: { precopyMs: 0, maxBandwidth: 0, hotStandby: true },
    nics: [],
    gate: { maxBytes: 16777216, maxFrames: 32768 },
  });
  const kvm = parseVmConfig({ ...minimalVm(), qemu: { accel: 'kvm' } }, base);
  t.equal(kvm.qemu.cpu, 'host', 'kvm defaults to -cpu host');
  const local = parseVmConfig({ ...minimalVm(), qemu: { binary: './bin/qemu', extraArgs: ['-device', 'x'] } }, base);
  t.equal(local.qemu.binary, '/etc/tether/bin/qemu', 'binary with a slash is resolved');
  t.same(local.qemu.extraArgs, ['-device', 'x']);
});

t.test('vm: nics and gate', async (t) => {
  const v = parseVmConfig(
    {
      ...minimalVm(),
      nics: [
        { mac: '52:54:00:AB:cd:01', bridge: 'br-guest', tap: 'tap-vm1-0' },
        { mac: '52:54:00:00:00:02', bridge: 'br0' },
      ],
      gate: { maxBytes: 8 << 20, maxFrames: 22_000 },
    },
    base,
  );
  t.same(v.nics, [
    { mac: '52:54:00:ab:cd:01', bridge: 'br-guest', tap: 'tap-vm1-0' },
    { mac: '52:54:00:00:00:02', bridge: 'br0', tap: 'vm1-1' },
  ]);
  t.same(v.gate, { maxBytes: 8 << 20, maxFrames: 22_000 });
  const long = parseVmConfig({ ...minimalVm(), name: 'a-very-long-vm-name', nics: [{ mac: '52:54:00:00:00:01', bridge: 'b' }] }, base);
  t.match(long.nics![0]!.tap, /^tt[0-9a-f]{8}-0$/, 'default TAP name fits IFNAMSIZ');
  t.same(parseVmConfig(v, base), v, 'a parsed config parses to itself (vm.json, prepare)');
  const nic = { mac: '52:54:00:00:00:01', bridge: 'br0' };
  const cases: Array<[unknown, unknown, string]> = [
    [{ x: 1 }, undefined, 'nics'],
    [[{ ...nic, mac: '52:54:00:00:00' }], undefined, 'nics[0].mac'],
    [[{ ...nic, mac: '53:54:00:00:00:01' }], undefined, 'nics[0].mac'],
    [[{ ...nic, mac: '00:00:00:00:00:00' }], undefined, 'nics[0].mac'],
    [[{ bridge: 'br0' }], undefined, 'nics[0].mac'],
    [[{ ...nic, bridge: 'br/0' }], undefined, 'nics[0].bridge'],
    [[{ ...nic, bridge: 'a-sixteen-chars-' }], undefined, 'nics[0].bridge'],
    [[{ mac: nic.mac }], undefined, 'nics[0].bridge'],
    [[{ ...nic, tap: 'tap 0' }], undefined, 'nics[0].tap'],
    [[{ ...nic, tap: 'br0' }], undefined, 'nics[0].tap'],
    [[{ ...nic, model: 'e1000' }], undefined, 'nics[0].model'],
    [[nic, { ...nic, tap: 'other' }], undefined, 'nics[1].mac'],
    [[nic, { ...nic, mac: '52:54:00:00:00:02', tap: 'vm1-0' }], undefined, 'nics[1].tap'],
    [[nic, { ...nic, mac: '52:54:00:00:00:02', tap: 'vm1-0-b' }], undefined, 'nics[1].tap'],
    [[{ ...nic, bridge: 'x-b', tap: 'x' }], undefined, 'nics[0].tap'],
    [undefined, { maxBytes: 100 }, 'gate.maxBytes'],
    [undefined, { maxBytes: 1 << 31 }, 'gate.maxBytes'],
    [undefined, { maxFrames: 1 << 21 }, 'gate.maxFrames'],
    [undefined, { maxFrames: 0 }, 'gate.maxFrames'],
    [undefined, { maxHeld: 1 }, 'gate.maxHeld'],
  ];
  for (const [nics, gate, field] of cases) {
    const e = err(() => parseVmConfig({ ...minimalVm(), ...(nics ? { nics } : {}), ...(gate ? { gate } : {}) }, base));
    t.equal(e.code, 'ERR_CONFIG_INVALID', field);
    t.equal(e.field, field, `${JSON.stringify(nics ?? gate)} names ${field}`);
  }
});

t.test('vm gate: the bound must leave working room above the reserve; the minimum follows the host', async (t) => {
  const at = (sndbuf: number) => ({ ...base, qemuSendBuffer: sndbuf });
  const min = gateMinimum(gateReserve(212_992));
  const ok = parseVmConfig({ ...minimalVm(), gate: { maxBytes: min.bytes, maxFrames: min.frames } }, at(212_992));
  t.same(ok.gate, { maxBytes: min.bytes, maxFrames: min.frames }, 'the minimum itself is accepted');
  for (const [gate, field] of [
    [{ maxBytes: min.bytes - 1 }, 'gate.maxBytes'],
    [{ maxFrames: min.frames - 1 }, 'gate.maxFrames'],
    [{ maxBytes: 65536, maxFrames: 16 }, 'gate.maxBytes'],
  ] as const) {
    const e = err(() => parseVmConfig({ ...minimalVm(), gate }, at(212_992)));
    t.equal(e.code, 'ERR_CONFIG_INVALID', field);
    t.equal(e.field, field);
    t.match(e.details, field === 'gate.maxBytes' ? { minimum: min.bytes } : { minimum: min.frames }, 'the minimum is in the details');
    t.match(e.message, /at least \d+/, e.message);
  }
  // the relay does not pause at barriers: the checkpoint window does not change the minimum
  const w1 = { ...minimalVm(), checkpoint: { window: 1 }, gate: { maxBytes: min.bytes, maxFrames: min.frames } };
  t.same(parseVmConfig({ ...w1, checkpoint: { window: 8 } }, at(212_992)).gate, { maxBytes: min.bytes, maxFrames: min.frames });
  // a larger send buffer needs more
  t.equal(err(() => parseVmConfig({ ...minimalVm(), gate: { maxBytes: min.bytes } }, at(4 << 20))).field, 'gate.maxBytes');
  // the default is 16 MiB / 32768 frames, raised to the minimum on a host that needs more
  t.same(parseVmConfig(minimalVm(), at(212_992)).gate, { maxBytes: 16 << 20, maxFrames: 32_768 });
  t.same(parseVmConfig(minimalVm(), at(32 << 20)).gate, gateDefaults(gateReserve(32 << 20)));
  t.ok(gateDefaults(gateReserve(32 << 20)).maxBytes > 16 << 20);
});

t.test('vm disk: defaults, relative image path, round trip', async (t) => {
  const vm = parseVmConfig({ ...minimalVm(), disk: { image: 'img/vm1.img' } }, base);
  t.same(vm.disk, {
    image: '/etc/tether/img/vm1.img',
    journalMaxBytes: 256 * 1024 * 1024,
    journalSegmentBytes: 128 * 1024 * 1024,
    reconnectDelaySec: 30,
  });
  const full = parseVmConfig(
    { ...minimalVm(), disk: { image: '/srv/vm1.img', journalMaxBytes: 33554432, journalSegmentBytes: 262144, reconnectDelaySec: 5 } },
    base,
  );
  t.same(full.disk, { image: '/srv/vm1.img', journalMaxBytes: 33554432, journalSegmentBytes: 262144, reconnectDelaySec: 5 });
  // The destination re-parses the config the source sends: the output is valid input.
  t.same(parseVmConfig(JSON.parse(JSON.stringify(full)), { baseDir: '/' }), full);
  t.equal(parseVmConfig(minimalVm(), base).disk, undefined, 'no disk unless configured');
});

t.test('vm: bad fields', async (t) => {
  const cases: Array<[string, unknown, string]> = [
    ['name', undefined, 'name'],
    ['name', 'vm,1', 'name'],
    ['qemu', 'x', 'qemu'],
    ['qemu.binary', '', 'qemu.binary'],
    ['qemu.accel', 'hvf', 'qemu.accel'],
    ['qemu.machine', 1, 'qemu.machine'],
    ['qemu.cpu', false, 'qemu.cpu'],
    ['qemu.extraArgs', '-S', 'qemu.extraArgs'],
    ['qemu.extraArgs', ['-S', 3], 'qemu.extraArgs[1]'],
    ['qemu.bogus', 1, 'qemu.bogus'],
    ['memoryMiB', undefined, 'memoryMiB'],
    ['memoryMiB', '512', 'memoryMiB'],
    ['memoryMiB', 512.5, 'memoryMiB'],
    ['memoryMiB', 8, 'memoryMiB'],
    ['cpus', 0, 'cpus'],
    ['cpus', 256, 'cpus'],
    ['kernel', undefined, 'kernel'],
    ['kernel', '', 'kernel'],
    ['initrd', 1, 'initrd'],
    ['append', ['a'], 'append'],
    ['checkpoint', [], 'checkpoint'],
    ['checkpoint.intervalMs', 4, 'checkpoint.intervalMs'],
    ['checkpoint.intervalMs', 10001, 'checkpoint.intervalMs'],
    ['checkpoint.intervalMs', '50', 'checkpoint.intervalMs'],
    ['checkpoint.failoverTimeoutMs', 50, 'checkpoint.failoverTimeoutMs'],
    ['checkpoint.failoverTimeoutMs', 1000, 'checkpoint.fenceTimeoutMs'], // 1500 >= 1000
    ['checkpoint.fenceTimeoutMs', 3000, 'checkpoint.fenceTimeoutMs'], // equal to failover
    ['checkpoint.fenceTimeoutMs', 40, 'checkpoint.fenceTimeoutMs'],
    ['checkpoint.fenceTimeoutMs', 50, 'checkpoint.fenceTimeoutMs'], // not > intervalMs (50)
    ['checkpoint.dirtyTracker', 'softdirty', 'checkpoint.dirtyTracker'],
    ['checkpoint.hashThreads', 0, 'checkpoint.hashThreads'],
    ['checkpoint.hashThreads', 65, 'checkpoint.hashThreads'],
    ['checkpoint.window', 0, 'checkpoint.window'],
    ['checkpoint.window', 17, 'checkpoint.window'],
    ['checkpoint.window', 2.5, 'checkpoint.window'],
    ['checkpoint.interval', 50, 'checkpoint.interval'],
    ['migration.precopyMs', -1, 'migration.precopyMs'],
    ['migration.maxBandwidth', 1e20, 'migration.maxBandwidth'],
    ['migration.maxBandwidth', '1G', 'migration.maxBandwidth'],
    ['migration.hotStandby', 'yes', 'migration.hotStandby'],
    ['migration.postcopy', true, 'migration.postcopy'],
    ['network', {}, 'network'],
    ['disk', 'img', 'disk'],
    ['disk.image', undefined, 'disk.image'],
    ['disk.image', '', 'disk.image'],
    ['disk.image', 3, 'disk.image'],
    ['disk.journalMaxBytes', 1024, 'disk.journalMaxBytes'],
    ['disk.journalMaxBytes', '256M', 'disk.journalMaxBytes'],
    ['disk.journalSegmentBytes', 4096, 'disk.journalSegmentBytes'],
    ['disk.reconnectDelaySec', 0, 'disk.reconnectDelaySec'],
    ['disk.reconnectDelaySec', 1.5, 'disk.reconnectDelaySec'],
    ['disk.cache', 'none', 'disk.cache'],
  ];
  for (const [field, value, expectField] of cases) {
    const e = err(() => parseVmConfig(withField(minimalVm(), field, value), base));
    t.equal(e.code, 'ERR_CONFIG_INVALID', `${field}=${JSON.stringify(value)}`);
    t.equal(e.field, expectField, `${field}=${JSON.stringify(value)} names ${expectField}`);
  }
  t.equal(
    err(() => parseVmConfig(withField(minimalVm(), 'checkpoint.intervalMs', 4), base)).message,
    'checkpoint.intervalMs: must be an integer between 5 and 10000, got number 4',
  );
});

t.test('files: unreadable, YAML syntax, duplicate keys, invalid field with file in details', async (t) => {
  const dir = tmpdir(t);
  t.match(
    err(() => loadVmConfig(path.join(dir, 'nope.yaml'))),
    { code: 'ERR_CONFIG_READ' },
  );
  t.match(
    err(() => loadHostConfig(dir)),
    { code: 'ERR_CONFIG_READ' },
    'a directory',
  );

  const bad = path.join(dir, 'bad.yaml');
  fs.writeFileSync(bad, 'name: vm1\nqemu: [unclosed\n');
  const e = err(() => loadVmConfig(bad));
  t.equal(e.code, 'ERR_CONFIG_YAML');
  t.equal(e.details?.['file'], bad);
  t.type(e.details?.['line'], 'number');

  fs.writeFileSync(bad, 'name: vm1\nname: vm2\n');
  t.match(
    err(() => loadVmConfig(bad)),
    { code: 'ERR_CONFIG_YAML' },
    'duplicate key',
  );

  fs.writeFileSync(bad, 'name: vm1\nmemoryMiB: 512\nkernel: k\ncheckpoint:\n  intervalMs: 1\n');
  const e2 = err(() => loadVmConfig(bad));
  t.match(e2, { code: 'ERR_CONFIG_INVALID', field: 'checkpoint.intervalMs' });
  t.equal(e2.details?.['file'], bad);

  fs.writeFileSync(bad, '');
  t.match(
    err(() => loadVmConfig(bad)),
    { code: 'ERR_CONFIG_INVALID', field: '' },
    'empty file',
  );
});

t.test('files: relative paths resolve against the YAML file directory, not cwd', async (t) => {
  const dir = tmpdir(t);
  fs.mkdirSync(path.join(dir, 'etc'));
  fs.writeFileSync(path.join(dir, 'etc', 'peer.key'), Buffer.alloc(32, 9), { mode: 0o600 });
  fs.writeFileSync(
    path.join(dir, 'etc', 'host.yaml'),
    'name: h\nstateDir: ../state\npeer:\n  listen: "127.0.0.1:7000"\n  keyFile: peer.key\n',
  );
  fs.writeFileSync(path.join(dir, 'etc', 'vm.yaml'), 'name: v\nmemoryMiB: 64\nkernel: ../guest/vmlinuz\ninitrd: ./initrd.img\n');
  const h = loadHostConfig(path.join(dir, 'etc', 'host.yaml'));
  t.equal(h.stateDir, path.join(dir, 'state'));
  t.ok(h.peer.key.equals(Buffer.alloc(32, 9)));
  const v = loadVmConfig(path.join(dir, 'etc', 'vm.yaml'));
  t.equal(v.kernel, path.join(dir, 'guest', 'vmlinuz'));
  t.equal(v.initrd, path.join(dir, 'etc', 'initrd.img'));
});

t.test('host: systemd scope and slice (absent: the daemon uses auto, machine.slice)', async (t) => {
  t.equal(parseHostConfig(minimalHost(), base).systemd, undefined);
  t.same(parseHostConfig({ ...minimalHost(), systemd: {} }, base).systemd, { scope: 'auto', slice: 'machine.slice' });
  t.same(parseHostConfig({ ...minimalHost(), systemd: { scope: 'always', slice: 'tether.slice' } }, base).systemd, {
    scope: 'always',
    slice: 'tether.slice',
  });
  const cases: Array<[string, unknown]> = [
    ['systemd.scope', 'yes'],
    ['systemd.slice', 'machine'],
    ['systemd.slice', 'a b.slice'],
    ['systemd.slice', 3],
    ['systemd.other', 1],
  ];
  for (const [field, value] of cases) {
    const e = err(() => parseHostConfig(withField({ ...minimalHost(), systemd: {} }, field, value), base));
    t.equal(e.code, 'ERR_CONFIG_INVALID', `${field}=${JSON.stringify(value)}`);
    t.equal(e.field, field);
  }
});
