import path from 'node:path';
import t from 'tap';
import { SWITCH_PORT_D } from '../lab/topology.ts';
import { assertNotRunningOn, assertConversationContinues, assertWireClean, bootNetCluster } from './scenarios.ts';
import { readGateLog } from '../lab/wire/wirecap.ts';

t.test('a verified TCP conversation with the guest survives a completed migration and goes on on the destination', async (t) => {
  const { c, client, wire } = await bootNetCluster(t, { vm: { maxBandwidth: 0 } }, true);
  const mig = await c.migrate();
  t.equal(mig.code, 0, `migrate exits 0: ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'completed');
  t.equal((await c.status(c.dst)).state, 'running', 'VM runs on the destination');
  await assertNotRunningOn(t, c, c.src);
  await assertConversationContinues(t, client, 'after the migration completed');
  const w = assertWireClean(t, c, wire, 'completed migration');
  if (w) t.ok(w.passed > 0, `the destination's frames after completion were captured (${w.passed})`);
  if (wire) {
    // QEMU's self-announce carries no guest state: it leaves D at once (the relay's
    // 'announce' lines), so the switch learns the VM's new port before the gate releases
    // the guest's first epoch, not after it.
    const log = readGateLog(path.join(c.dst.stateDir, c.vmName, 'net0.gate.jsonl'));
    const firstRelease = log.find((r) => r.t === 'release')?.mono ?? Infinity;
    const rarps = wire.frames().filter((f) => f.port === SWITCH_PORT_D && f.type === '8035');
    t.ok(
      log.some((r) => r.t === 'announce'),
      "the relay let QEMU's announce out (an 'announce' line)",
    );
    t.ok(
      rarps.some((f) => f.mono < firstRelease),
      `the switch got D's RARP announce before the gate's first release (${rarps.length} RARPs from D captured)`,
    );
  }
});
