/**
 * A guest NIC through the sidecar: virtio-net in the guest, QEMU's stream netdev to the
 * sidecar, the sidecar's TAP in a host bridge. The host pings the guest: ARP and ICMP
 * cross the gate both ways. The NIC survives a sidecar restart and a migration.
 */
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import { Cluster, qemuAlive, sh, waitFor } from './harness.ts';
import { waitApplied } from './scenarios.ts';
import type { Host } from './harness.ts';

const GUEST_IP = '10.99.0.2';
const TAP = 'tvm1n0';
const MAC = '52:54:00:99:00:02';

function bridge(c: Cluster, h: Host): void {
  sh('ip', ['-n', h.ns, 'link', 'add', 'br0', 'type', 'bridge']);
  sh('ip', ['-n', h.ns, 'addr', 'add', '10.99.0.1/24', 'dev', 'br0']);
  sh('ip', ['-n', h.ns, 'link', 'set', 'br0', 'up']);
}

/** One ping from the host's bridge address to the guest. */
function ping(h: Host): boolean {
  // busybox (busybox-static, already needed for the guest image) has ping; iputils may be absent
  return sh('ip', ['netns', 'exec', h.ns, 'busybox', 'ping', '-c', '1', '-W', '1', GUEST_IP], { allowFail: true }).includes(
    ' 0% packet loss',
  );
}

function link(h: Host, dev: string): string {
  return sh('ip', ['-n', h.ns, '-d', 'link', 'show', dev], { allowFail: true });
}

function metric(c: Cluster, h: Host, action: string): number {
  const m = new RegExp(`^tether_gate_frames_total\\{action="${action}",nic="net0",vm="vm1"\\} (\\d+)`, 'm').exec(c.metrics(h));
  return m ? Number(m[1]) : 0;
}

async function boot(t: Test, vm: { maxBandwidth?: number } = {}, holdCompletion = false): Promise<Cluster> {
  const c = new Cluster({
    holdCompletion,
    vm: {
      ...vm,
      appendExtra: `tether.ip=${GUEST_IP}/24`,
      extraYaml: ['nics:', `  - mac: "${MAC}"`, '    bridge: br0', `    tap: ${TAP}`],
    },
    env: { TETHER_GATE_LOG: '1' },
  });
  t.teardown(() => c.cleanup());
  await c.up();
  bridge(c, c.src);
  bridge(c, c.dst);
  const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
  t.equal(r.code, 0, `vm start: ${r.stderr}`);
  await waitFor(() => ping(c.src), 'the guest answers ping on the source', 120_000);
  return c;
}

t.test('frames flow both ways through the sidecar, also after a sidecar restart', async (t) => {
  const c = await boot(t);
  t.match(link(c.src, TAP), /master br0/, 'the TAP is in the bridge');
  t.match(link(c.src, TAP), /tun type tap/);
  t.ok(metric(c, c.src, 'passed') > 0, 'guest frames passed the source gate');
  t.ok(metric(c, c.src, 'to_guest') > 0, 'host frames reached the guest');

  const pid = (await c.status(c.src)).pid;
  await c.killDaemon(c.src);
  t.ok(qemuAlive(pid), 'QEMU survives the sidecar');
  t.match(link(c.src, TAP), /master br0/, 'the persistent TAP stays in its bridge');
  await c.restartDaemon(c.src);
  t.equal((await c.status(c.src)).pid, pid, 'same QEMU adopted');
  await waitFor(() => ping(c.src), 'the guest answers ping after the sidecar restart', 30_000);
  t.pass('NIC reconnected: QEMU went back to listening and the new sidecar connected');

  const r = await c.tether(c.src, ['vm', 'stop', c.vmName]);
  t.equal(r.code, 0, `vm stop: ${r.stderr}`);
  t.equal(link(c.src, TAP), '', 'vm stop removed the TAP');
});

t.test('after a completed migration the guest answers through the destination; the source TAP is gone', async (t) => {
  const c = await boot(t);
  const mig = await c.migrate();
  t.equal(mig.code, 0, `migrate: ${mig.stderr.slice(-1500)}`);
  t.equal(link(c.src, TAP), '', 'source TAP removed once the VM left');
  t.match(link(c.dst, TAP), /master br0/, 'destination TAP in its bridge');
  await waitFor(() => ping(c.dst), 'the guest answers ping on the destination', 30_000);
  const log = fs
    .readFileSync(path.join(c.dst.stateDir, c.vmName, 'net0.gate.jsonl'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));
  t.same(log[0], { ...log[0], t: 'mode', mode: 'gated', epoch: 1 }, 'the destination gate starts gated at epoch 1');
  t.ok(
    log.some((r) => r.t === 'mode' && r.mode === 'pass'),
    'and passes through after completion',
  );
  t.ok(metric(c, c.dst, 'passed') > 0, 'frames passed through the destination gate after completion');
});

t.test('in the post-copy window the destination gate releases on ACK; after kill -9 of its QEMU the source NIC comes back', async (t) => {
  // The destination does not ask to complete (holdCompletion): the window stays open for
  // the pings below, however fast the post-copy stream.
  const c = await boot(t, {}, true);
  const migrating = c.migrate();
  await waitApplied(c, 2, migrating);
  // The guest runs on D now: its echo replies are held until their epoch is acked, then released.
  await waitFor(() => ping(c.dst), 'the guest answers ping through the gated destination', 30_000);
  const gateLog = (): Record<string, any>[] =>
    fs
      .readFileSync(path.join(c.dst.stateDir, c.vmName, 'net0.gate.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
  t.ok(
    gateLog().some((r) => r.t === 'release' && r.frames > 0),
    'the destination released held frames on ACK',
  );
  t.ok(metric(c, c.dst, 'released') > 0, 'released frames counted');
  t.equal(metric(c, c.dst, 'passed'), 0, 'nothing passed the destination gate unheld');

  const dpid = (await c.status(c.dst)).pid;
  process.kill(dpid, 'SIGKILL');
  const mig = await migrating;
  t.equal(mig.result?.outcome, 'rolled-back', `rolled back: ${mig.stderr.slice(-1500)}`);
  await waitFor(() => ping(c.src), 'the guest answers ping on the source after the rollback', 30_000);
  t.pass("the port reconnected to the restored QEMU's socket");
  await waitFor(() => link(c.dst, TAP) === '', 'the fenced destination removed its TAP', 30_000);
  t.ok(
    gateLog().some((r) => r.t === 'mode' && r.mode === 'discarded'),
    'the destination gate was discarded by the fence',
  );
});
