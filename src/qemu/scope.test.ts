import t from 'tap';
import { createLogger } from '../util/log.ts';
import { resolveScope, scopeArgv, scopeUnitName, type ScopeEnv } from './scope.ts';

function capture(): { log: ReturnType<typeof createLogger>; lines: { level: string; msg: string }[] } {
  const lines: { level: string; msg: string }[] = [];
  return { log: createLogger({}, 'debug', (l) => lines.push(JSON.parse(l) as { level: string; msg: string })), lines };
}

function fakeEnv(pid1: boolean, result: string | null): ScopeEnv & { calls: string[][] } {
  const calls: string[][] = [];
  return {
    calls,
    systemdIsPid1: () => pid1,
    run: async (argv) => {
      calls.push(argv);
      return result;
    },
  };
}

t.test('scopeArgv: systemd-run --scope execs the QEMU command line unchanged after --', async (t) => {
  const qemu = ['qemu-system-x86_64', '-name', 'vm1', '-append', 'console=ttyS0 -- x'];
  const argv = scopeArgv({ systemdRun: 'systemd-run', slice: 'machine.slice' }, 'tether-vm1-0a1b2c3d.scope', 'tether VM vm1 (QEMU)', qemu);
  t.same(argv, [
    'systemd-run',
    '--scope',
    '--quiet',
    '--collect',
    '--slice=machine.slice',
    '--unit=tether-vm1-0a1b2c3d.scope',
    '--description=tether VM vm1 (QEMU)',
    '--',
    ...qemu,
  ]);
  // Everything after the first "--" is QEMU's, untouched (an argument that is "--" itself included).
  t.same(argv.slice(argv.indexOf('--') + 1), qemu);
});

t.test('scopeUnitName: one unit per QEMU, named after the VM', async (t) => {
  t.equal(scopeUnitName('vm1', 'deadbeef'), 'tether-vm1-deadbeef.scope');
  const a = scopeUnitName('vm1');
  const b = scopeUnitName('vm1');
  t.match(a, /^tether-vm1-[0-9a-f]{8}\.scope$/);
  t.not(a, b, 'a hot standby and the VM it stands by never share a unit name');
});

t.test('resolveScope auto without systemd as PID 1: no scope, a warning, nothing run', async (t) => {
  const env = fakeEnv(false, null);
  const { log, lines } = capture();
  t.equal(await resolveScope(undefined, env, log), null);
  t.same(env.calls, [], 'systemd-run is not tried');
  t.equal(lines.length, 1);
  t.equal(lines[0]!.level, 'warn');
  t.match(lines[0]!.msg, 'systemd is not PID 1');
});

t.test('resolveScope auto with systemd: a probe scope decides', async (t) => {
  const env = fakeEnv(true, null);
  const { log, lines } = capture();
  t.same(await resolveScope({ scope: 'auto', slice: 'tether.slice' }, env, log), { systemdRun: 'systemd-run', slice: 'tether.slice' });
  t.equal(env.calls.length, 1);
  const probe = env.calls[0]!;
  t.same(probe.slice(0, 5), ['systemd-run', '--scope', '--quiet', '--collect', '--slice=tether.slice']);
  t.same(probe.slice(probe.indexOf('--') + 1), ['true'], 'the probe runs true in a scope');
  t.equal(lines[0]!.level, 'info');

  const failing = fakeEnv(true, 'Failed to connect to bus');
  const c2 = capture();
  t.equal(await resolveScope(undefined, failing, c2.log), null, 'a failing probe falls back');
  t.equal(c2.lines[0]!.level, 'warn');
  t.match(c2.lines[0]!.msg, 'systemd-run --scope fails');
});

t.test('resolveScope always: the probe runs even without PID-1 systemd, and a failure refuses', async (t) => {
  const works = fakeEnv(false, null);
  t.ok(await resolveScope({ scope: 'always', slice: 'machine.slice' }, works, capture().log));
  t.equal(works.calls.length, 1);
  const broken = fakeEnv(false, 'System has not been booted with systemd');
  await t.rejects(resolveScope({ scope: 'always', slice: 'machine.slice' }, broken, capture().log), { code: 'ERR_QEMU_SCOPE' });
});

t.test('resolveScope never: no scope, no probe', async (t) => {
  const env = fakeEnv(true, null);
  t.equal(await resolveScope({ scope: 'never', slice: 'machine.slice' }, env, capture().log), null);
  t.same(env.calls, []);
});
