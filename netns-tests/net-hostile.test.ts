import t from 'tap';
import type { Test } from 'tap';
import { waitFor } from '../lab/proc.ts';
import { metricValue, waitApplied } from '../lab/cluster.ts';
import type { Cluster } from '../lab/cluster.ts';
import type { NetClient } from '../lab/net/driver.ts';
import type { WireCapture } from '../lab/wire/wirecap.ts';
import { SWITCH_PORT_D } from '../lab/topology.ts';
import { gateMinimum, gateReserve } from '../src/gate/reserve.ts';
import { bootNetCluster, NET_MODE, wireCheck } from './scenarios.ts';

/**
 * A hostile guest inside the destination's window: runt Ethernet frames (14 bytes, a bare
 * header: the shortest a Linux guest can put on its NIC; shorter ones are refused by the
 * guest kernel's AF_PACKET and covered at the socket level by src/net/relay.test.ts and
 * nic.test.ts), frames one byte short of Ethernet's 60-byte minimum, maximal 65 535-byte
 * frames sent with the guest's MTU raised (not segmentation offload: one frame each), and
 * a TCP bulk transfer whose offloaded frames are up to 64 KiB. The gate runs at the
 * smallest bound the config accepts (src/gate/reserve.ts), so the maximal frames overrun it.
 *
 * What must hold: the destination's sidecar lives through it (same process, answers
 * status), the gate never holds more than its bound and counts every frame it refused,
 * no frame of an unacknowledged epoch reaches the wire (the capture against the gate's
 * release log), every runt the gate did not refuse reaches the client's switch, the
 * migration completes, the TCP conversation stays verified, and after completion (the
 * sidecar out of the path) the guest's runts reach the wire directly.
 */
const { bytes: MAX_BYTES, frames: MAX_FRAMES } = gateMinimum(gateReserve());
const ETHERTYPE = '88b5';

/** net0's sample of metric `name` with these further labels (NaN when absent: every comparison fails). */
const metric = (text: string, name: string, labels: Record<string, string> = {}): number =>
  metricValue(text, name, { nic: 'net0', ...labels });

/** Ask the guest for `count` raw frames of `size` bytes; resolves with how many it sent. */
async function frames(client: NetClient, count: number, size: number): Promise<number> {
  const before = client.events.filter((e) => e.ev === 'frames').length;
  client.command(`frames ${count} ${size}`);
  await waitFor(
    () => client.events.filter((e) => e.ev === 'frames').length > before,
    `the guest to send ${count} frames of ${size} bytes`,
    120_000,
  );
  return client.events.filter((e) => e.ev === 'frames')[before]!.sent as number;
}

/** The guest's test frames the client's switch received from the destination, by length. */
function onWire(wire: WireCapture, size: number, since = 0): number {
  return wire.frames().filter((f) => f.port === SWITCH_PORT_D && f.type === ETHERTYPE && f.len === size && f.mono > since).length;
}

async function boot(t: Test, gateOpen: boolean): Promise<{ c: Cluster; client: NetClient; wire: WireCapture }> {
  const { c, client, wire } = await bootNetCluster(
    t,
    {
      gate: { maxBytes: MAX_BYTES, maxFrames: MAX_FRAMES },
      holdCompletion: true,
      ...(gateOpen ? { faults: { destination: 'gate-open' } } : {}),
    },
    true,
  );
  return { c, client, wire: wire! };
}

t.test(
  'a hostile guest in the window: runts, maximal frames and a bulk transfer; the sidecar lives, the bound holds, every refusal is counted',
  { skip: NET_MODE !== 'gate' ? 'needs the gate' : false },
  async (t) => {
    const { c, client, wire } = await boot(t, false);
    const migrating = c.migrate();
    await waitApplied(c, 1, migrating);
    const daemon = c.dst.daemon!;
    const sent = {
      runt: await frames(client, 100, 14),
      short: await frames(client, 100, 59),
      maximal: 0,
    };
    const releasedBefore = metric(c.metrics(c.dst), 'tether_gate_bytes_total', { action: 'released' }) || 0;
    sent.maximal = await frames(client, 30, 65_535);
    t.same(sent, { runt: 100, short: 100, maximal: 30 }, 'the guest sent every frame it was asked for');
    const gateLines = (text: string) => text.split('\n').filter((l) => /^tether_(gate|nic)_/.test(l) && / [1-9]\d*$/.test(l));
    t.comment(`after the maximal burst: ${gateLines(c.metrics(c.dst)).join('; ')}`);
    // Only maximal frames add 64 KiB to the released bytes this fast (the conversation's
    // answers are ~150 bytes each): some went through the relay and the gate whole.
    await waitFor(
      () => metric(c.metrics(c.dst), 'tether_gate_bytes_total', { action: 'released' }) - releasedBefore >= 65_535,
      'a maximal frame released by the gate',
      60_000,
    );
    client.command(`bulk ${8 << 20}`);
    const bulk = await client.waitEvent((e) => e.ev === 'bulk', 'the guest\u2019s bulk transfer through the gate', 180_000);
    t.comment(`bulk 8 MiB guest -> client through the gate in ${bulk.ms} ms`);
    t.equal(daemon.exitCode, null, 'the destination sidecar is the same process, still running');
    t.ok((await c.status(c.dst)).migration, 'and answers status');
    const m = c.metrics(c.dst);
    const refused = metric(m, 'tether_nic_frames_dropped_total', { reason: 'gate_full' });
    t.ok(
      metric(m, 'tether_gate_held_bytes_max') <= MAX_BYTES,
      `peak held ${metric(m, 'tether_gate_held_bytes_max')} bytes <= bound ${MAX_BYTES}`,
    );
    t.ok(
      metric(m, 'tether_gate_held_frames_max') <= MAX_FRAMES,
      `peak held ${metric(m, 'tether_gate_held_frames_max')} frames <= bound ${MAX_FRAMES}`,
    );
    t.equal(metric(m, 'tether_gate_over_bound_bytes_total'), 0, 'no byte held beyond the bound');
    t.ok(refused > 0, `the maximal frames overran the bound: ${refused} frames refused and counted (gate_full)`);
    for (const reason of ['runt', 'malformed', 'framing', 'relay_error'])
      t.equal(
        metric(m, 'tether_nic_frames_dropped_total', { reason }),
        0,
        `no ${reason} drop (a 14-byte frame is a whole Ethernet header: the relay passes it)`,
      );

    await waitFor(() => onWire(wire, 14) + onWire(wire, 59) + refused >= 200, 'the runts released to the wire', 60_000);
    c.releaseCompletion();
    const mig = await migrating;
    t.equal(mig.result?.outcome, 'completed', `the migration completes: ${mig.stderr.slice(-1500)}`);
    const wired = { runt: onWire(wire, 14), short: onWire(wire, 59), maximal: onWire(wire, 65_535) };
    t.comment(`on the wire from the destination: ${JSON.stringify(wired)}; refused at the bound: ${refused}`);
    t.ok(
      wired.runt + wired.short + refused >= 200 && wired.runt + wired.short <= 200,
      'every runt reached the wire or was refused and counted',
    );
    t.equal(wired.maximal, 0, 'no 65 535-byte frame crossed the 1500-byte segment (the bridge drops them, as a NIC would)');
    const { check } = wireCheck(c, wire);
    t.same(check.violations.slice(0, 20), [], `no frame left the destination before its ACK (${check.released} released)`);

    // After completion the guest's NIC is QEMU's own tap: the sidecar is out of the path.
    const after = performance.timeOrigin + performance.now();
    const mono0 = Number(process.hrtime.bigint()) / 1e6;
    t.equal(await frames(client, 50, 14), 50, 'the guest sent 50 more runts after completion');
    await waitFor(() => onWire(wire, 14, mono0) >= 50, 'the runts on the wire after completion', 30_000);
    t.equal(onWire(wire, 14, mono0), 50, 'all 50 reached the wire directly');
    await client.waitAnswers(5, 'after the hostile frames', after);
    t.same(client.violations, [], 'the TCP conversation stayed verified');
  },
);

// CONTROL: the same runts with the destination's gate forced open (TETHER_FAULTS=gate-open)
// must reach the wire before any ACK released them: the capture check reports it.
t.test(
  'CONTROL: with the gate forced open, the hostile guest\u2019s runts reach the wire unreleased',
  { skip: NET_MODE !== 'gate' ? 'needs the gate' : false },
  async (t) => {
    const { c, client, wire } = await boot(t, true);
    const migrating = c.migrate();
    await waitApplied(c, 1, migrating);
    t.equal(await frames(client, 100, 14), 100, 'the guest sent 100 runts');
    await waitFor(() => onWire(wire, 14) >= 100, 'the runts on the wire', 60_000);
    c.releaseCompletion();
    const mig = await migrating;
    t.equal(mig.result?.outcome, 'completed', `the migration completes: ${mig.stderr.slice(-1500)}`);
    const { check } = wireCheck(c, wire);
    const runts = check.violations.filter((v) => v.includes(`type ${ETHERTYPE}, 14 B`));
    t.ok(runts.length > 0, `the capture reports runts that no ACK released: ${runts.length}, e.g. ${runts[0]}`);
  },
);
