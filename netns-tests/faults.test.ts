import { spawn } from 'node:child_process';
import t from 'tap';
import type { Cluster } from '../lab/cluster.ts';
import type { Test } from 'tap';
import { fileSize, waitFor } from '../lab/proc.ts';
import { waitPasses } from '../lab/serial.ts';
import { assertNotRunningOn, assertSurvivedOnSource, bootCluster } from './scenarios.ts';

/*
 * The first four scenarios share one cluster: the destination's faults and key change with a
 * restart of its sidecar (it holds no VM between scenarios), and each scenario but the
 * last leaves the VM running and verified on the source, where the next one starts. The
 * destination starts with a key of its own: it has never seen the VM.
 * The cluster boots in t.before: tap's root test would end by itself while a top-level
 * await keeps it idle.
 */
let c: Cluster;
t.before(async () => {
  // the destination does not ask to complete before a scenario's fault hits the migration
  c = await bootCluster(t, { mismatchedKeys: true, holdCompletion: true });
});

/** Restart the destination sidecar with `faults` (none if absent) and its own key or the shared one. */
async function destination(t: Test, d: { faults?: string; ownKey?: boolean }): Promise<void> {
  await assertNotRunningOn(t, c, c.dst);
  t.equal(await c.termDaemon(c.dst), 0, 'the destination sidecar stopped for this scenario');
  c.setPeerKey(c.dst, d.ownKey ?? false);
  await c.restartDaemon(c.dst, { faults: d.faults });
}

t.test('a destination without the peer key gets nothing: the migration is refused and the VM keeps running', async (t) => {
  const ramBefore = await c.status(c.src);
  const mig = await c.migrate();
  // never reached a tether peer it trusts: an error with its cause, not a rollback
  t.equal(mig.code, 1, 'migrate exits 1');
  t.match(mig.stderr, /ERR_PEER_(AUTH|HANDSHAKE)/, `refused: ${mig.stderr.trim()}`);
  const s = await c.status(c.src);
  t.equal(s.state, 'running');
  t.equal(s.pid, ramBefore.pid, 'the same source QEMU kept running');
  const d = await c.status(c.dst);
  t.equal(d.state, 'absent', 'the destination never created the VM');
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 1, 'after the refused migration');
  t.same(rep.corrupt, []);
});

for (const mode of ['corrupt', 'truncate'] as const) {
  t.test(`a ${mode === 'corrupt' ? 'corrupted' : 'truncated'} checkpoint is rejected and the previous one restores`, async (t) => {
    await destination(t, { faults: `${mode}-epoch=4` });
    const mig = await c.migrate();
    if (mode === 'corrupt') {
      // the source's decoder refused the frame (CRC, or MAC if the CRC happened to match)
      t.match(mig.result?.error?.code, /^ERR_PROTO_BAD_(CRC|MAC)$/, `rejected with ${mig.result?.error?.code}`);
    } else {
      t.equal(mig.result?.reason, 'peer-channel-closed', 'the half-sent checkpoint was discarded when the channel dropped');
    }
    // checkpoint 4 never applied: the source resumes from 3, which is intact
    await assertSurvivedOnSource(t, c, mig, (e) => e === 3);
  });
}

t.test('a migration that reaches no tether peer is an error with its cause, and changes nothing', async (t) => {
  await destination(t, {});
  const before = await c.status(c.src);
  // something that speaks TCP but not tether, on the destination host
  const junk = spawn(
    'ip',
    [
      'netns',
      'exec',
      c.dst.ns,
      process.execPath,
      '-e',
      `require('net').createServer((s) => s.end('HTTP/1.1 400 Bad Request\\r\\n\\r\\n')).listen(7799, '${c.dst.addr}', () => console.log('listening'))`,
    ],
    { stdio: ['ignore', 'pipe', 'ignore'] },
  );
  t.teardown(() => void junk.kill('SIGKILL'));
  let listening = false;
  junk.stdout!.on('data', () => (listening = true));
  await waitFor(() => listening, 'the non-tether listener', 30_000);
  for (const [what, port, code] of [
    ['refused port', 7798, /ERR_PEER_CONNECT/],
    ['not a tether peer', 7799, /ERR_(PEER_HANDSHAKE|PROTO_\w+)/],
  ] as const) {
    const r = await c.tether(c.src, ['migrate', c.vmName, '--to', `${c.dst.addr}:${port}`, '--json']);
    t.equal(r.code, 1, `${what}: migrate exits 1 (${r.stderr.trim()})`);
    t.match(r.stderr, code, `${what}: the cause is named`);
    t.notMatch(r.stdout, /rolled-back/, `${what}: not reported as a rollback`);
    const s = await c.status(c.src);
    t.equal(s.state, 'running', `${what}: VM still running`);
    t.equal(s.pid, before.pid, `${what}: the same QEMU`);
    t.equal(s.migration, null, `${what}: no migration left behind`);
  }
  c.releaseCompletion();
  const mig = await c.migrate();
  t.equal(mig.code, 0, `a migration to the real peer still completes: ${mig.stderr.slice(-1000)}`);
  await c.cleanup(); // its guest would only load the CPU during the next scenario
});

t.test('failure before the first checkpoint resumes from checkpoint 0', async (t) => {
  const c = await bootCluster(t, {
    faults: { destination: 'delay-first-checkpoint-ms=600000' },
    vm: { fenceTimeoutMs: 60000, failoverTimeoutMs: 120000 },
  });
  const migrating = c.migrate();
  // the VM runs on the destination (post-copy), but no checkpoint was taken yet
  await waitFor(async () => (await c.status(c.src)).migration?.phase === 'postcopy', 'switchover');
  const d = await c.status(c.dst);
  process.kill(d.pid, 'SIGKILL');
  await assertSurvivedOnSource(t, c, await migrating, (e) => e === 0);
});
