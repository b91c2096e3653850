import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import t from 'tap';
import { GUARD_SCRIPT, procStartTime } from './guard.ts';

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

async function until(fn: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !fn(); i++) await new Promise((r) => setTimeout(r, 10));
}

/**
 * The sidecar is played by a Node child that arms a guard over a victim (`sleep`) and then
 * dies by SIGKILL, or disarms first: what matters is what the guard does after its parent is gone.
 */
function sidecar(mode: 'die' | 'disarm-then-die' | 'pause-then-die'): Promise<{ victim: number; guard: number }> {
  const victim = spawn('sleep', ['300'], { stdio: 'ignore', detached: true });
  victim.unref();
  const code = `
    import('${new URL('./guard.ts', import.meta.url).href}').then(({ QemuGuard }) => {
      const g = QemuGuard.arm(${victim.pid});
      process.stdout.write(String(g.pid) + '\\n');
      ${mode === 'disarm-then-die' ? 'g.disarm();' : mode === 'pause-then-die' ? 'g.pauseOnly();' : ''}
      setTimeout(() => process.kill(process.pid, 'SIGKILL'), 200);
    });`;
  const child = spawn(process.execPath, ['--import', 'tsx', '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve) => {
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.on('exit', () => resolve({ victim: victim.pid!, guard: Number(out.trim()) }));
  });
}

t.test('procStartTime names one process', async (t) => {
  t.match(procStartTime(process.pid), /^\d+$/);
  t.throws(() => procStartTime(2 ** 22 + 7), { code: 'ERR_GUARD' });
});

t.test('the sidecar dies while armed: the guarded process is killed', async (t) => {
  const { victim, guard } = await sidecar('die');
  t.teardown(() => void (alive(victim) && process.kill(victim, 'SIGKILL')));
  await until(() => !alive(victim));
  t.notOk(alive(victim), 'guarded process killed');
  await until(() => !alive(guard));
  t.notOk(alive(guard), 'guard exited');
});

t.test('disarmed before the sidecar dies: the process lives on', async (t) => {
  const { victim, guard } = await sidecar('disarm-then-die');
  t.teardown(() => void (alive(victim) && process.kill(victim, 'SIGKILL')));
  await until(() => !alive(guard));
  t.notOk(alive(guard), 'guard exited');
  t.ok(alive(victim), 'process not killed');
});

t.test('in pause-only mode the sidecar death freezes the process instead of killing it', async (t) => {
  const { victim, guard } = await sidecar('pause-then-die');
  t.teardown(() => void (alive(victim) && process.kill(victim, 'SIGKILL')));
  const state = () => readFileSync(`/proc/${victim}/stat`, 'latin1').split(') ')[1]![0];
  await until(() => !alive(guard));
  await until(() => state() === 'T');
  t.equal(state(), 'T', 'stopped');
  t.ok(alive(victim), 'not killed');
});

t.test('a guard never kills a different process that reused the pid', async (t) => {
  const victim = spawn('sleep', ['300'], { stdio: 'ignore' });
  t.teardown(() => void victim.kill('SIGKILL'));
  // the start time recorded at arming is not this process's: the pid was reused meanwhile
  const wrong = String(Number(procStartTime(victim.pid!)) + 1);
  const guard = spawn('/bin/sh', ['-c', GUARD_SCRIPT, 'tether-guard', String(victim.pid), wrong], { stdio: ['pipe', 'ignore', 'ignore'] });
  const exited = new Promise((r) => guard.on('exit', r));
  guard.stdin.end(); // EOF: the sidecar is gone
  await exited;
  t.ok(alive(victim.pid!), 'not killed');
});
