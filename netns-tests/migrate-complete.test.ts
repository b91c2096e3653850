import t from 'tap';
import { fileSize, qemuAlive } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { assertNotRunningOn, bootCluster } from './scenarios.ts';

t.test('migration completes and the guest keeps running on the destination', async (t) => {
  const c = await bootCluster(t, { vm: { maxBandwidth: 0 } });
  const mig = await c.migrate();
  t.equal(mig.code, 0, `migrate exits 0: ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'completed');
  t.ok((mig.result?.checkpoints ?? 0) >= 1, `checkpoints taken: ${mig.result?.checkpoints}`);
  const s = await c.status(c.dst);
  t.equal(s.state, 'running', 'VM runs on the destination');
  t.ok(qemuAlive(s.pid));
  // what the operator's CLI shows (the harness asks the control socket directly)
  const cli = await c.tether(c.dst, ['status', c.vmName, '--json']);
  t.equal(cli.code, 0, `tether status: ${cli.stderr}`);
  t.same(JSON.parse(cli.stdout), s, '`tether status --json` prints the status the control socket gives');
  await assertNotRunningOn(t, c, c.src);
  const from = fileSize(c.serialLog(c.dst));
  const rep = await waitPasses(c.serialLog(c.dst), from, 2, 'on the destination');
  t.same(rep.corrupt, [], 'no CORRUPT on the destination');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT on the source');
  t.same(memcheck(c.serialLog(c.dst)).corrupt, [], 'no CORRUPT anywhere on the destination');

  // what the operator's Prometheus sees
  const sm = c.metrics(c.src);
  t.match(sm, /^tether_migrations_total\{outcome="completed",role="source"\} 1$/m, 'source counts the completed migration');
  const applied = Number(/^tether_checkpoints_applied_total (\d+)$/m.exec(sm)?.[1]);
  t.equal(applied, mig.result?.checkpoints, 'checkpoints applied match the migration result');
  t.match(sm, /^tether_checkpoint_pause_seconds_count [1-9]\d*$/m, 'checkpoint pauses observed');
  t.match(c.metrics(c.dst), /^tether_migrations_total\{outcome="completed",role="destination"\} 1$/m);
  t.match(c.metrics(c.dst), /^tether_vms\{state="running"\} 1$/m, 'destination runs one VM');
});
