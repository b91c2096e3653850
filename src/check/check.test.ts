import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { TetherError } from '../errors.ts';
import {
  allPassed,
  formatResult,
  MIGRATION_CAPABILITIES,
  QMP_COMMANDS,
  runChecks,
  stageReserveBytes,
  type CheckEnv,
  type CheckResult,
  type PathInfo,
} from './check.ts';
import { loadVmConfig } from '../config/load.ts';

const SRC = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TMPFS = 0x01021994;
const EXT4 = 0xef53;
const MiB = 1024 * 1024;

interface Setup {
  dir: string;
  host: string;
  vmDir: string;
  ramDir: string;
  keyFile: string;
  image: string;
  kernel: string;
}

/** A host config and one VM (a NIC on br0, a disk) in a temp dir; `vm` lines replace the defaults. */
function setup(t: { teardown(fn: () => void): void }, opts: { vmYaml?: string; hostExtra?: string[]; keyMode?: number } = {}): Setup {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-check-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const s: Setup = {
    dir,
    host: path.join(dir, 'host.yaml'),
    vmDir: path.join(dir, 'vms'),
    ramDir: path.join(dir, 'ram'),
    keyFile: path.join(dir, 'peer.key'),
    image: path.join(dir, 'vm1.img'),
    kernel: path.join(dir, 'vmlinuz'),
  };
  fs.mkdirSync(s.vmDir);
  fs.writeFileSync(s.keyFile, Buffer.alloc(32, 1).toString('base64'), { mode: opts.keyMode ?? 0o600 });
  fs.chmodSync(s.keyFile, opts.keyMode ?? 0o600);
  fs.writeFileSync(
    s.host,
    [
      'name: h',
      `stateDir: ${dir}/state`,
      `ramDir: ${s.ramDir}`,
      `vmConfigDir: ${s.vmDir}`,
      'peer:',
      '  listen: "10.0.0.1:7700"',
      `  keyFile: ${s.keyFile}`,
      ...(opts.hostExtra ?? []),
      '',
    ].join('\n'),
  );
  fs.writeFileSync(
    path.join(s.vmDir, 'vm1.yaml'),
    opts.vmYaml ??
      [
        'name: vm1',
        'memoryMiB: 256',
        `kernel: ${s.kernel}`,
        'nics:',
        '  - mac: "52:54:00:00:00:01"',
        '    bridge: br0',
        'disk:',
        `  image: ${s.image}`,
        '',
      ].join('\n'),
  );
  return s;
}

const file = (size = 0): PathInfo => ({ kind: 'file', mode: 0o100644, uid: 0, size, allocated: 0 });

/** A host where everything passes; `o` overrides single probes. */
function fakeEnv(s: Setup, o: Partial<CheckEnv> & { paths?: Record<string, PathInfo | null> } = {}): CheckEnv {
  const paths: Record<string, PathInfo | null> = { [s.kernel]: file(), [s.image]: file(64 * MiB), ...o.paths };
  const realStat = (p: string): PathInfo | null => {
    try {
      const st = fs.statSync(p);
      return { kind: st.isDirectory() ? 'dir' : 'file', mode: st.mode, uid: st.uid, size: st.size, allocated: st.blocks * 512 };
    } catch {
      return null;
    }
  };
  const { paths: _p, ...rest } = o;
  return {
    stat: (p) => (p in paths ? paths[p]! : realStat(p)),
    access: () => null,
    statfs: () => ({ type: TMPFS, free: 64 * 1024 * MiB }),
    linkKind: async () => 'bridge',
    openDevice: () => null,
    lockProbe: () => null,
    directProbe: () => null,
    qemuVersion: async () => ({ major: 7, minor: 2, micro: 22, package: 'Debian' }),
    qemuQmp: async () => ({
      commands: [...QMP_COMMANDS, 'query-commands'],
      migrationCapabilities: [...MIGRATION_CAPABILITIES],
      postcopyError: null,
    }),
    softDirty: () => ({ supported: false, why: 'CONFIG_MEM_SOFT_DIRTY off' }),
    bindProbe: async () => null,
    scope: async () => ({ slice: null, why: 'systemd is not PID 1' }),
    readSysctl: () => '0',
    euid: 0,
    ...rest,
  };
}

function failures(rs: CheckResult[]): { name: string; code: string | undefined }[] {
  return rs.filter((r) => r.status === 'fail').map((r) => ({ name: r.name, code: r.code }));
}

t.test('a host where every probe passes: all ok, and every kind of check ran', async (t) => {
  const s = setup(t);
  const rs = await runChecks({ config: s.host }, fakeEnv(s));
  t.same(failures(rs), []);
  t.ok(allPassed(rs));
  const names = rs.map((r) => r.name);
  for (const n of [
    'host config',
    'vmConfigDir',
    `vm config ${path.join(s.vmDir, 'vm1.yaml')}`,
    'stateDir',
    'ramDir',
    'listen peer.listen',
    'ramDir space',
    'vm vm1: kernel',
    'qemu qemu-system-x86_64',
    'qmp qemu-system-x86_64',
    'post-copy qemu-system-x86_64',
    'bridge br0',
    'kernel: TUN',
    'kernel: soft-dirty',
    'vm vm1: disk image',
    'vm vm1: disk image locks',
    'qemu scope',
  ])
    t.ok(names.includes(n), `checked: ${n}`);
});

t.test('a broken host config: one failure with its config code, nothing else checked', async (t) => {
  const s = setup(t, { hostExtra: ['logLevel: loud'] });
  const rs = await runChecks({ config: s.host }, fakeEnv(s));
  t.same(failures(rs), [{ name: 'host config', code: 'ERR_CONFIG_INVALID' }]);
  t.equal(rs.length, 1);
  const missing = await runChecks({ config: path.join(s.dir, 'nope.yaml') }, fakeEnv(s));
  t.same(failures(missing), [{ name: 'host config', code: 'ERR_CONFIG_READ' }]);
});

t.test('VM configs: a bad one and a misnamed one fail, the others are still checked', async (t) => {
  const s = setup(t);
  fs.writeFileSync(path.join(s.vmDir, 'bad.yaml'), 'name: bad\nmemoryMiB: 1\nkernel: k\n');
  fs.writeFileSync(path.join(s.vmDir, 'other.yaml'), `name: vm2\nmemoryMiB: 64\nkernel: ${s.kernel}\n`);
  fs.writeFileSync(path.join(s.vmDir, 'broken.yaml'), 'name: [\n');
  const rs = await runChecks({ config: s.host }, fakeEnv(s));
  t.same(failures(rs), [
    { name: `vm config ${path.join(s.vmDir, 'bad.yaml')}`, code: 'ERR_CONFIG_INVALID' },
    { name: `vm config ${path.join(s.vmDir, 'broken.yaml')}`, code: 'ERR_CONFIG_YAML' },
    { name: `vm config ${path.join(s.vmDir, 'other.yaml')}`, code: 'ERR_CONFIG_INVALID' },
  ]);
  t.ok(
    rs.some((r) => r.name === 'vm vm1: disk image' && r.status === 'ok'),
    'vm1 is still checked',
  );
});

t.test('vmConfigDir missing: ERR_CHECK_PATH; VM files given on the command line are checked anyway', async (t) => {
  const s = setup(t);
  const extra = path.join(s.dir, 'example.yaml');
  fs.renameSync(path.join(s.vmDir, 'vm1.yaml'), extra);
  fs.rmdirSync(s.vmDir);
  const rs = await runChecks({ config: s.host, vmFiles: [extra] }, fakeEnv(s));
  t.same(failures(rs), [{ name: 'vmConfigDir', code: 'ERR_CHECK_PATH' }]);
  t.ok(
    rs.some((r) => r.name === 'bridge br0'),
    "the given VM's bridge is checked",
  );
});

t.test('ramDir: not tmpfs, not creatable, not a directory', async (t) => {
  const s = setup(t);
  let rs = await runChecks({ config: s.host }, fakeEnv(s, { statfs: () => ({ type: EXT4, free: 2 ** 40 }) }));
  t.same(failures(rs), [{ name: 'ramDir', code: 'ERR_CHECK_RAM_DIR' }]);
  rs = await runChecks({ config: s.host }, fakeEnv(s, { access: (p) => (p === s.dir ? 'EROFS' : null) }));
  t.same(
    failures(rs).filter((f) => f.name === 'ramDir'),
    [{ name: 'ramDir', code: 'ERR_CHECK_PATH' }],
    'missing ramDir under a read-only parent',
  );
  rs = await runChecks({ config: s.host }, fakeEnv(s, { paths: { [s.ramDir]: file() } }));
  t.same(
    failures(rs).filter((f) => f.name === 'ramDir'),
    [{ name: 'ramDir', code: 'ERR_CHECK_PATH' }],
    'ramDir is a file',
  );
});

t.test('ramDir space: RAM files not yet allocated plus one stage per VM', async (t) => {
  const s = setup(t);
  const vm = loadVmConfig(path.join(s.vmDir, 'vm1.yaml'));
  const need = 256 * MiB + stageReserveBytes(vm);
  t.equal(stageReserveBytes(vm), 256 * MiB + 256 * MiB + 64 * MiB + 64 * MiB + 128 * MiB, 'RAM + journal bound + in flight + devstate');
  let rs = await runChecks({ config: s.host }, fakeEnv(s, { statfs: () => ({ type: TMPFS, free: need - 1 }) }));
  t.same(failures(rs), [{ name: 'ramDir space', code: 'ERR_CHECK_SPACE' }]);
  rs = await runChecks({ config: s.host }, fakeEnv(s, { statfs: () => ({ type: TMPFS, free: need }) }));
  t.same(failures(rs), []);
  // A running VM's RAM file already holds its pages: only the stage is still needed.
  const ram: PathInfo = { kind: 'file', mode: 0o100600, uid: 0, size: 256 * MiB, allocated: 256 * MiB };
  rs = await runChecks(
    { config: s.host },
    fakeEnv(s, { statfs: () => ({ type: TMPFS, free: stageReserveBytes(vm) }), paths: { [path.join(s.ramDir, 'vm1.ram')]: ram } }),
  );
  t.same(failures(rs), []);
});

t.test('peer key file readable by others: the loader refuses the host config (ERR_CONFIG_KEY_MODE)', async (t) => {
  for (const mode of [0o644, 0o640, 0o602]) {
    const s = setup(t, { keyMode: mode });
    const rs = await runChecks({ config: s.host }, fakeEnv(s));
    t.same(failures(rs), [{ name: 'host config', code: 'ERR_CONFIG_KEY_MODE' }], mode.toString(8));
  }
  const s = setup(t, { keyMode: 0o400 });
  t.same(failures(await runChecks({ config: s.host }, fakeEnv(s))), [], '0400 is fine');
});

t.test('listen addresses that are not this host: ERR_LISTEN', async (t) => {
  const s = setup(t, { hostExtra: ['metrics: "127.0.0.1:9700"'] });
  const rs = await runChecks({ config: s.host }, fakeEnv(s, { bindProbe: async (h) => (h === '10.0.0.1' ? 'EADDRNOTAVAIL' : null) }));
  t.same(failures(rs), [{ name: 'listen peer.listen', code: 'ERR_LISTEN' }]);
  t.ok(rs.some((r) => r.name === 'listen metrics' && r.status === 'ok'));
});

t.test('QEMU: missing, too old, lacking QMP commands, refusing post-copy', async (t) => {
  const s = setup(t);
  const q = (o: Partial<CheckEnv>) => runChecks({ config: s.host }, fakeEnv(s, o)).then(failures);
  t.same(await q({ qemuVersion: async () => Promise.reject(new Error('spawn ENOENT')) }), [
    { name: 'qemu qemu-system-x86_64', code: 'ERR_CHECK_QEMU' },
  ]);
  t.same(await q({ qemuVersion: async () => ({ major: 7, minor: 1, micro: 0, package: '' }) }), [
    { name: 'qemu qemu-system-x86_64', code: 'ERR_CHECK_QEMU' },
  ]);
  t.same(await q({ qemuVersion: async () => ({ major: 6, minor: 9, micro: 0, package: '' }) }), [
    { name: 'qemu qemu-system-x86_64', code: 'ERR_CHECK_QEMU' },
  ]);
  t.same(await q({ qemuVersion: async () => ({ major: 8, minor: 0, micro: 0, package: '' }) }), [], '8.0 is newer');
  t.same(
    await q({
      qemuQmp: async () => ({
        commands: QMP_COMMANDS.filter((c) => c !== 'xen-save-devices-state'),
        migrationCapabilities: [...MIGRATION_CAPABILITIES],
        postcopyError: null,
      }),
    }),
    [{ name: 'qmp qemu-system-x86_64', code: 'ERR_CHECK_QMP' }],
  );
  t.same(
    await q({ qemuQmp: async () => ({ commands: [...QMP_COMMANDS], migrationCapabilities: ['postcopy-ram'], postcopyError: null }) }),
    [{ name: 'qmp qemu-system-x86_64', code: 'ERR_CHECK_QMP' }],
  );
  t.same(await q({ qemuQmp: async () => Promise.reject(new Error('QMP timeout')) }), [
    { name: 'qmp qemu-system-x86_64', code: 'ERR_CHECK_QMP' },
  ]);
  t.same(
    await q({
      qemuQmp: async () => ({
        commands: [...QMP_COMMANDS],
        migrationCapabilities: [...MIGRATION_CAPABILITIES],
        postcopyError: 'Postcopy is not supported',
      }),
    }),
    [{ name: 'post-copy qemu-system-x86_64', code: 'ERR_CHECK_KERNEL' }],
  );
});

t.test('bridges: missing, or a link that is no bridge', async (t) => {
  const s = setup(t);
  t.same(failures(await runChecks({ config: s.host }, fakeEnv(s, { linkKind: async () => null }))), [
    { name: 'bridge br0', code: 'ERR_CHECK_BRIDGE' },
  ]);
  t.same(failures(await runChecks({ config: s.host }, fakeEnv(s, { linkKind: async () => 'veth' }))), [
    { name: 'bridge br0', code: 'ERR_CHECK_BRIDGE' },
  ]);
});

t.test('kernel: TUN only when a VM has a NIC; soft-dirty only when a VM requires it; KVM only for kvm VMs', async (t) => {
  const s = setup(t);
  t.same(failures(await runChecks({ config: s.host }, fakeEnv(s, { openDevice: () => 'ENOENT' }))), [
    { name: 'kernel: TUN', code: 'ERR_CHECK_KERNEL' },
  ]);
  const plain = setup(t, {
    vmYaml: `name: vm1\nmemoryMiB: 64\nkernel: /k\nqemu:\n  accel: kvm\ncheckpoint:\n  dirtyTracker: soft-dirty\n`,
  });
  const rs = await runChecks(
    { config: plain.host },
    fakeEnv(plain, { openDevice: (p) => (p === '/dev/kvm' ? 'ENOENT' : null), paths: { '/k': file() } }),
  );
  t.same(failures(rs), [
    { name: 'kernel: KVM', code: 'ERR_CHECK_KERNEL' },
    { name: 'kernel: soft-dirty', code: 'ERR_MEM_SOFTDIRTY_UNSUPPORTED' },
  ]);
  t.ok(rs.some((r) => r.name === 'kernel: TUN' && r.status === 'skip'));
});

t.test('disk image: missing, not writable, empty, a directory; locks unsupported', async (t) => {
  const s = setup(t);
  const f = (o: Partial<CheckEnv> & { paths?: Record<string, PathInfo | null> }) =>
    runChecks({ config: s.host }, fakeEnv(s, o)).then(failures);
  const img = [{ name: 'vm vm1: disk image', code: 'ERR_CHECK_IMAGE' }];
  t.same(await f({ paths: { [s.image]: null } }), img, 'missing');
  t.same(await f({ access: (p) => (p === s.image ? 'EACCES' : null) }), img, 'not writable');
  t.same(await f({ paths: { [s.image]: file(0) } }), img, 'empty');
  t.same(await f({ paths: { [s.image]: { ...file(), kind: 'dir' } } }), img, 'a directory');
  t.same(await f({ paths: { [s.image]: { ...file(), kind: 'block' } } }), [], 'a block device');
  t.same(await f({ lockProbe: () => 'ENOLCK' }), [{ name: 'vm vm1: disk image locks', code: 'ERR_CHECK_LOCK' }]);
  t.same(await f({ lockProbe: () => 'EAGAIN' }), [], 'someone holds a conflicting lock: locks work');
  t.same(
    await f({ directProbe: () => 'EINVAL' }),
    [{ name: 'vm vm1: disk image O_DIRECT', code: 'ERR_CHECK_IMAGE' }],
    'no O_DIRECT (tmpfs)',
  );
});

t.test('qemu scope: always without scopes fails with ERR_QEMU_SCOPE', async (t) => {
  const s = setup(t);
  const rs = await runChecks(
    { config: s.host },
    fakeEnv(s, { scope: async () => Promise.reject(new TetherError('ERR_QEMU_SCOPE', 'systemd-run --scope fails')) }),
  );
  t.same(failures(rs), [{ name: 'qemu scope', code: 'ERR_QEMU_SCOPE' }]);
});

t.test('peers: the handshake error is the result; a malformed peer is a usage error', async (t) => {
  const s = setup(t);
  const rs = await runChecks(
    { config: s.host, peers: ['10.0.0.2:7700', '10.0.0.3:7700', 'nonsense'] },
    fakeEnv(s, {
      peerProbe: async (h) => {
        if (h === '10.0.0.3') throw new TetherError('ERR_PEER_AUTH', 'the peer failed authentication');
      },
    }),
  );
  t.same(failures(rs), [
    { name: 'peer 10.0.0.3:7700', code: 'ERR_PEER_AUTH' },
    { name: 'peer nonsense', code: 'ERR_USAGE' },
  ]);
  t.ok(rs.some((r) => r.name === 'peer 10.0.0.2:7700' && r.status === 'ok'));
});

t.test('formatResult: one line per check, FAIL lines carry the code', async (t) => {
  t.equal(formatResult({ name: 'ramDir', status: 'ok', message: '/dev/shm/x on tmpfs' }), 'ok    ramDir: /dev/shm/x on tmpfs');
  t.equal(formatResult({ name: 'kernel: TUN', status: 'skip', message: 'no NIC' }), 'skip  kernel: TUN: no NIC');
  t.equal(
    formatResult({ name: 'bridge br0', status: 'fail', code: 'ERR_CHECK_BRIDGE', message: 'no link br0' }),
    'FAIL  bridge br0: ERR_CHECK_BRIDGE no link br0',
  );
  t.notOk(allPassed([{ name: 'x', status: 'fail', code: 'ERR_CHECK_PATH', message: '' }]));
  t.ok(allPassed([{ name: 'x', status: 'skip', message: '' }]));
});

t.test('QMP_COMMANDS is every QMP command tether sends (no command goes unchecked)', async (t) => {
  const files: string[] = [];
  const walk = (d: string): void => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      // Relative to src/: the clone's own path may contain a "check" directory (CI clones
      // into /check/...), which must not exclude every file.
      else if (e.name.endsWith('.ts') && !e.name.endsWith('.test.ts') && path.relative(SRC, p).split(path.sep)[0] !== 'check')
        files.push(p);
    }
  };
  walk(SRC);
  const used = new Set<string>();
  for (const f of files) {
    for (const m of fs.readFileSync(f, 'utf8').matchAll(/\.execute(?:<[^>]*>)?\(\s*'([a-z][a-z0-9_-]*)'/g)) used.add(m[1]!);
  }
  t.ok(used.size >= 10, `found ${used.size} commands`);
  t.same([...used].sort(), [...QMP_COMMANDS].sort());
  // The capabilities source.ts/destination.ts turn on.
  const caps = new Set<string>();
  for (const f of files) for (const m of fs.readFileSync(f, 'utf8').matchAll(/capability: '([a-z-]+)'/g)) caps.add(m[1]!);
  t.same([...caps].sort(), [...MIGRATION_CAPABILITIES].sort());
});

t.test('a probe that throws fails its own group, not the run', async (t) => {
  const s = setup(t);
  const rs = await runChecks(
    { config: s.host },
    fakeEnv(s, {
      lockProbe: () => {
        throw new TetherError('ERR_MEM_NATIVE_MISSING', 'the native addon is not built');
      },
      linkKind: async () => Promise.reject(new Error('spawn ip ENOENT')),
    }),
  );
  t.same(failures(rs), [
    { name: 'bridges', code: 'ERR_INTERNAL' },
    { name: 'vm vm1: disk image', code: 'ERR_MEM_NATIVE_MISSING' },
  ]);
  t.ok(
    rs.some((r) => r.name === 'qemu scope'),
    'later checks still ran',
  );
});
