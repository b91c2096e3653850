import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { Cluster } from '../lab/cluster.ts';
import { fileSize, qemuAlive, waitFor } from '../lab/proc.ts';
import { ROOT } from '../lab/topology.ts';
import { waitPasses } from '../lab/serial.ts';

/*
 * Deployment that does not kill guests (docs/deploy.md):
 *  - the shipped systemd unit verifies clean, and keeps the properties guests depend on;
 *  - without systemd as PID 1 (this machine) the daemon falls back to plain children and
 *    says so; with scopes, QEMU is started through `systemd-run --scope` — here a stand-in
 *    systemd-run on the daemon's PATH that records its arguments and execs the command,
 *    as the real one does once the scope exists;
 *  - QEMU lives in a session and process group of its own: a signal to the sidecar's whole
 *    process group does not reach the guest, and the next sidecar adopts it.
 */
const UNIT = path.join(ROOT, 'deploy', 'tether.service');
const TETHER = path.join(ROOT, 'bin', 'tether.mjs');

function unitProps(text: string): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (const line of text.split('\n')) {
    const kv = /^([A-Za-z]+)=(.*)$/.exec(line.trim());
    if (kv) m.set(kv[1]!, [...(m.get(kv[1]!) ?? []), kv[2]!]);
  }
  return m;
}

t.test('deploy/tether.service: systemd-analyze verify finds nothing to say', async (t) => {
  const tool = spawnSync('systemd-analyze', ['--version'], { encoding: 'utf8' });
  if (tool.error) {
    t.pass(`SKIP: systemd-analyze is not installed here (${tool.error.message}); the unit's properties are checked below`);
    return;
  }
  // verify insists that ExecStart's binary exists: install tether where the unit expects it
  // (/usr/local/bin/tether, as `npm link` does), in a private mount namespace.
  const verify = (unit: string) =>
    spawnSync(
      'unshare',
      [
        '--mount',
        '--propagation',
        'private',
        'sh',
        '-euc',
        `mount -t tmpfs tmpfs /usr/local/bin && ln -s "$1" /usr/local/bin/tether && systemd-analyze verify "$2"`,
        'sh',
        path.join(ROOT, 'bin', 'tether.mjs'),
        unit,
      ],
      { encoding: 'utf8' },
    );
  const r = verify(UNIT);
  t.equal(r.status, 0, 'exit 0');
  t.equal((r.stdout + r.stderr).trim(), '', 'no warning at all');
  // The check has teeth: a misspelt setting is reported (systemd-analyze still exits 0).
  const bad = path.join(fs.mkdtempSync('/tmp/tether-unit-'), 'tether.service');
  t.teardown(() => fs.rmSync(path.dirname(bad), { recursive: true, force: true }));
  fs.writeFileSync(bad, fs.readFileSync(UNIT, 'utf8').replace(/^KillMode=process$/m, 'KillMode=proces'));
  t.match(verify(bad).stderr, /kill mode/i, 'a broken copy is reported');
});

t.test("deploy/tether.service keeps what guests depend on, and nothing that hides QEMU's files", async (t) => {
  const p = unitProps(fs.readFileSync(UNIT, 'utf8'));
  t.same(p.get('KillMode'), ['process'], 'a stop signals the sidecar only');
  t.same(p.get('Restart'), ['on-failure']);
  t.match(p.get('ExecStart')?.[0] ?? '', /^\/\S+\/tether daemon --config \S+$/);
  t.same(p.get('TasksMax'), ['infinity'], "guests' threads are not the sidecar's budget");
  t.same(p.get('OOMPolicy'), ['continue']);
  for (const forbidden of [
    'PrivateTmp',
    'PrivateDevices',
    'PrivateMounts',
    'PrivateNetwork',
    'TemporaryFileSystem',
    'MemoryDenyWriteExecute',
    'SystemCallFilter',
    'RestrictAddressFamilies',
    'RuntimeDirectory',
  ])
    t.equal(p.get(forbidden), undefined, `no ${forbidden}`);
});

t.test('QEMU in a scope via systemd-run; its own process group; the fallback warns', async (t) => {
  const dir = fs.mkdtempSync('/tmp/tether-fake-systemd-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const calls = path.join(dir, 'calls.log');
  // The stand-in: records "<pid> <args>", refuses anything but --scope, then execs what follows "--".
  fs.writeFileSync(
    path.join(dir, 'systemd-run'),
    [
      '#!/bin/sh',
      `echo "$$ $*" >> '${calls}'`,
      '[ "$1" = --scope ] || exit 1',
      'while [ $# -gt 0 ] && [ "$1" != "--" ]; do shift; done',
      'shift',
      'exec "$@"',
      '',
    ].join('\n'),
    { mode: 0o755 },
  );
  const c = new Cluster({ env: { PATH: `${dir}:${process.env.PATH}` } });
  t.teardown(() => c.cleanup());
  await c.up();

  // This machine has no systemd as PID 1: auto falls back, with a warning, and never
  // calls systemd-run.
  const log = () => fs.readFileSync(c.src.daemonLog, 'utf8');
  t.match(log(), /"level":"warn".*systemd is not PID 1/, 'the fallback is logged as a warning');
  t.notOk(fs.existsSync(calls), 'auto does not try systemd-run without systemd');

  // tether check --peer: an authenticated handshake with the other sidecar.
  const peerCheck = (config: string) => {
    const r = spawnSync(
      'ip',
      ['netns', 'exec', c.dst.ns, process.execPath, TETHER, 'check', '--config', config, '--peer', `${c.src.addr}:7700`, '--json'],
      {
        encoding: 'utf8',
      },
    );
    const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { checks: { name: string; status: string; code?: string }[] };
    return out.checks.find((x) => x.name === `peer ${c.src.addr}:7700`);
  };
  t.match(peerCheck(c.dst.config), { status: 'ok' }, 'check --peer reaches the source sidecar, same key');
  const otherKey = path.join(dir, 'other.key');
  fs.writeFileSync(otherKey, randomBytes(32).toString('base64'), { mode: 0o600 });
  const impostor = path.join(dir, 'impostor.yaml');
  fs.writeFileSync(impostor, fs.readFileSync(c.dst.config, 'utf8').replace(/^ {2}keyFile: .*$/m, `  keyFile: ${otherKey}`));
  t.match(peerCheck(impostor), { status: 'fail', code: 'ERR_PEER_AUTH' }, 'another key: ERR_PEER_AUTH');

  // systemd.scope: always — the daemon probes, then starts QEMU through systemd-run.
  t.equal(await c.termDaemon(c.src), 0);
  fs.appendFileSync(c.src.config, 'systemd:\n  scope: always\n  slice: tether-test.slice\n');
  await c.restartDaemon(c.src);
  const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
  t.equal(r.code, 0, `vm start: ${r.stderr}`);
  const st = await c.status(c.src);
  const lines = fs.readFileSync(calls, 'utf8').trim().split('\n');
  t.match(
    lines[0],
    /^\d+ --scope --quiet --collect --slice=tether-test\.slice --unit=tether-probe-[0-9a-f]{8}\.scope .* -- true$/,
    'the probe',
  );
  const qemuCall = lines.find((l) => l.startsWith(`${st.pid} `));
  t.ok(qemuCall, `systemd-run ran as the pid tether records for QEMU (${st.pid}): it exec'd QEMU`);
  t.match(
    qemuCall,
    / --scope --quiet --collect --slice=tether-test\.slice --unit=tether-vm1-[0-9a-f]{8}\.scope --description=tether VM vm1 \(QEMU\) -- qemu-system-x86_64 /,
  );
  t.match(fs.readFileSync(`/proc/${st.pid}/cmdline`, 'latin1').split('\0')[0], /qemu-system-x86_64$/, 'the process is QEMU now');
  await waitPasses(c.serialLog(c.src), 0, 1, 'guest runs in its scope');

  // A session and process group of its own.
  const stat = (pid: number) => {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    const f = s.slice(s.lastIndexOf(') ') + 2).split(' ');
    return { pgrp: Number(f[2]), session: Number(f[3]) };
  };
  const daemonPid = c.src.daemon!.pid!;
  const q = stat(st.pid!);
  const d = stat(daemonPid);
  t.not(q.pgrp, d.pgrp, 'QEMU is not in the sidecar process group');
  t.not(q.session, d.session, 'nor in its session');
  t.equal(q.pgrp, st.pid, 'QEMU leads a process group of its own');

  // SIGKILL to the sidecar's whole process group (a terminal's ^C goes to a group, as does a
  // supervisor's kill of the group): the guest runs on.
  const gone = new Promise((res) => c.src.daemon!.once('exit', res));
  process.kill(-d.pgrp, 'SIGKILL');
  await gone;
  t.ok(qemuAlive(st.pid), 'QEMU survived the signal to the sidecar group');
  await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 1, 'guest runs without its sidecar');
  await c.restartDaemon(c.src);
  await waitFor(async () => (await c.status(c.src)).state === 'running', 'VM adopted', 60_000);
  t.equal((await c.status(c.src)).pid, st.pid, 'the next sidecar adopts the same QEMU');
});
