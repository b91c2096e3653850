import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { ROOT } from '../lab/topology.ts';
import { sh, sweepStale } from '../lab/proc.ts';

/*
 * `tether check` on a host prepared the way docs/deploy.md says, in a network namespace
 * (addresses, bridges) and a private mount namespace (the paths the shipped configs name:
 * /etc/tether/vms, /srv/shared/vm1.img), so the shipped configs are checked exactly as
 * shipped; and on a broken host, which must report each specific code.
 */
const TETHER = path.join(ROOT, 'bin', 'tether.mjs');
const CONFIGS = path.join(ROOT, 'configs');

interface CheckOutput {
  code: number | null;
  stdout: string;
  stderr: string;
  json?: { ok: boolean; checks: { name: string; status: string; code?: string; message: string }[] };
}

/** A namespace named like the harness's (sweepStale removes it if this process dies). */
function netns(t: { teardown(fn: () => void): void }, suffix: 's' | 'd'): string {
  const ns = `tt${process.pid}x9${suffix === 's' ? 1 : 2}${suffix}`;
  sweepStale();
  sh('ip', ['netns', 'add', ns]);
  t.teardown(() => void sh('ip', ['netns', 'del', ns], { allowFail: true }));
  sh('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
  return ns;
}

/** Runs `script` (sh) in the namespace, in a private mount namespace of its own. */
function inNs(ns: string, script: string): CheckOutput {
  const r = spawnSync('ip', ['netns', 'exec', ns, 'unshare', '--mount', '--propagation', 'private', 'sh', '-euc', script], {
    encoding: 'utf8',
    timeout: 120_000,
  });
  const out: CheckOutput = { code: r.status, stdout: r.stdout, stderr: r.stderr };
  const last = r.stdout.trim().split('\n').pop() ?? '';
  if (last.startsWith('{')) out.json = JSON.parse(last) as CheckOutput['json'];
  return out;
}

const q = (s: string): string => `'${s.replaceAll("'", `'\\''`)}'`;

t.test('the shipped host configs and the example VM (a NIC and a disk) pass on a prepared host', async (t) => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-check-'));
  t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
  for (const [host, addr, suffix] of [
    ['host-a', '10.10.0.1', 's'],
    ['host-b', '10.10.0.2', 'd'],
  ] as const) {
    const ns = netns(t, suffix);
    // What the example needs on a host: its peer address, the VM NIC's bridge.
    sh('ip', ['-n', ns, 'link', 'add', 'uplink', 'type', 'veth', 'peer', 'name', 'uplink-p']);
    sh('ip', ['-n', ns, 'addr', 'add', `${addr}/24`, 'dev', 'uplink']);
    sh('ip', ['-n', ns, 'link', 'set', 'uplink', 'up']);
    sh('ip', ['-n', ns, 'link', 'add', 'br-guest', 'type', 'bridge']);
    const up = path.join(tmp, `${host}-etc`);
    fs.mkdirSync(path.join(up, 'upper'), { recursive: true });
    fs.mkdirSync(path.join(up, 'work'));
    // ...its vmConfigDir (/etc/tether/vms: an overlay keeps the real /etc untouched) and
    // the shared image (/srv/shared/vm1.img, on a tmpfs over /srv). Private mounts: gone
    // with the process.
    const prepare = [
      `mount -t overlay overlay -o lowerdir=/etc,upperdir=${q(path.join(up, 'upper'))},workdir=${q(path.join(up, 'work'))} /etc`,
      'mkdir -p /etc/tether/vms',
      'mount -t tmpfs -o size=256m tmpfs /srv',
      'mkdir /srv/shared',
      'truncate -s 64M /srv/shared/vm1.img',
    ].join('\n');
    const cmd = `${q(TETHER)} check --config ${q(path.join(CONFIGS, `${host}.yaml`))} ${q(path.join(CONFIGS, 'vm-example.yaml'))}`;
    const r = inNs(ns, `${prepare}\n${cmd} --json`);
    t.equal(r.code, 0, `${host}: tether check exits 0 (stderr: ${r.stderr.trim()})`);
    const checks = r.json?.checks ?? [];
    t.same(
      checks.filter((c) => c.status === 'fail'),
      [],
      `${host}: nothing fails`,
    );
    const okNames = checks.filter((c) => c.status === 'ok').map((c) => c.name);
    for (const n of [
      'host config',
      `vm config ${path.join(CONFIGS, 'vm-example.yaml')}`,
      'ramDir',
      'ramDir space',
      'listen peer.listen',
      'bridge br-guest',
      'kernel: TUN',
      'vm vm1: disk image',
      'vm vm1: disk image locks',
      'qemu qemu-system-x86_64',
      'qmp qemu-system-x86_64',
      'post-copy qemu-system-x86_64',
    ])
      t.ok(okNames.includes(n), `${host}: ${n} ok`);
    // The text form: a line per check, and the same verdict.
    const text = inNs(ns, `${prepare}\n${cmd}`);
    t.equal(text.code, 0);
    t.match(text.stdout, /^ok {4}bridge br-guest: /m);
    t.match(text.stdout, /all \d+ checks passed/);
  }
});

t.test('a broken host: each problem is reported with its code, exit 1', async (t) => {
  const ns = netns(t, 's');
  sh('ip', ['-n', ns, 'link', 'add', 'notabridge', 'type', 'veth', 'peer', 'name', 'notabridge-p']);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-check-broken-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const vms = path.join(dir, 'vms');
  fs.mkdirSync(vms);
  const key = path.join(dir, 'peer.key');
  fs.writeFileSync(key, Buffer.alloc(32, 3).toString('base64'));
  fs.chmodSync(key, 0o600);
  // A QEMU too old for tether.
  const oldQemu = path.join(dir, 'qemu-old');
  fs.writeFileSync(oldQemu, '#!/bin/sh\necho "QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2)"\n', { mode: 0o755 });
  const imgDir = path.join(dir, 'img-is-a-dir');
  fs.mkdirSync(imgDir);
  fs.writeFileSync(
    path.join(dir, 'host.yaml'),
    [
      'name: broken',
      `stateDir: ${dir}/state`,
      `ramDir: ${dir}/ram`, // on the test's disk, not tmpfs
      `vmConfigDir: ${vms}`,
      'peer:',
      '  listen: "10.10.9.9:7700"', // not an address of this host
      `  keyFile: ${key}`,
      '',
    ].join('\n'),
  );
  const guest = path.join(ROOT, '.cache', 'guest', 'current');
  fs.writeFileSync(
    path.join(vms, 'vm1.yaml'),
    [
      'name: vm1',
      'memoryMiB: 64',
      `kernel: ${path.join(guest, 'vmlinuz')}`,
      'nics:',
      '  - mac: "52:54:00:00:00:01"',
      '    bridge: br-missing',
      '  - mac: "52:54:00:00:00:02"',
      '    bridge: notabridge',
      'disk:',
      `  image: ${path.join(dir, 'missing.img')}`,
      '',
    ].join('\n'),
  );
  fs.writeFileSync(
    path.join(vms, 'vm2.yaml'),
    [
      'name: vm2',
      'memoryMiB: 64',
      `kernel: ${path.join(dir, 'no-kernel')}`,
      `qemu:`,
      `  binary: ${oldQemu}`,
      'disk:',
      `  image: ${imgDir}`,
      '',
    ].join('\n'),
  );
  fs.writeFileSync(path.join(vms, 'vm3.yaml'), 'name: vm3\nmemoryMiB: 8\nkernel: k\n'); // memoryMiB below 16
  fs.writeFileSync(path.join(vms, 'wrong-name.yaml'), `name: vm4\nmemoryMiB: 64\nkernel: k\n`);

  const r = inNs(ns, `${q(TETHER)} check --config ${q(path.join(dir, 'host.yaml'))} --json`);
  t.equal(r.code, 1, 'exit 1');
  const failed = (r.json?.checks ?? []).filter((c) => c.status === 'fail').map((c) => [c.name, c.code]);
  t.same(
    failed.sort(),
    [
      ['ramDir', 'ERR_CHECK_RAM_DIR'],
      ['listen peer.listen', 'ERR_LISTEN'],
      [`vm config ${path.join(vms, 'vm3.yaml')}`, 'ERR_CONFIG_INVALID'],
      [`vm config ${path.join(vms, 'wrong-name.yaml')}`, 'ERR_CONFIG_INVALID'],
      ['vm vm2: kernel', 'ERR_CHECK_PATH'],
      [`qemu ${oldQemu}`, 'ERR_CHECK_QEMU'],
      ['bridge br-missing', 'ERR_CHECK_BRIDGE'],
      ['bridge notabridge', 'ERR_CHECK_BRIDGE'],
      ['vm vm1: disk image', 'ERR_CHECK_IMAGE'],
      ['vm vm2: disk image', 'ERR_CHECK_IMAGE'],
    ].sort(),
    'exactly the planted problems, each with its code',
  );
  // The text form names the code on each FAIL line.
  const text = inNs(ns, `${q(TETHER)} check --config ${q(path.join(dir, 'host.yaml'))}`);
  t.equal(text.code, 1);
  t.match(text.stdout, /^FAIL {2}bridge br-missing: ERR_CHECK_BRIDGE /m);
  t.match(text.stdout, /^FAIL {2}ramDir: ERR_CHECK_RAM_DIR /m);
  t.match(text.stdout, /10 of \d+ checks FAILED/);
  // A key file others can read: the host config itself is refused, by the loader's code.
  fs.chmodSync(key, 0o644);
  const keyed = inNs(ns, `${q(TETHER)} check --config ${q(path.join(dir, 'host.yaml'))} --json`);
  t.equal(keyed.code, 1, 'exit 1');
  t.same(
    (keyed.json?.checks ?? []).filter((c) => c.status === 'fail').map((c) => [c.name, c.code]),
    [['host config', 'ERR_CONFIG_KEY_MODE']],
  );
});
