import { execFile } from 'node:child_process';
import fs from 'node:fs';
import t from 'tap';
import type { Test } from 'tap';
import { GUEST_IP } from '../lab/topology.ts';
import { softnetDropped, waitFor } from '../lab/proc.ts';
import { gateDefaults, gateReserve, qemuSendBuffer } from '../src/gate/reserve.ts';
import { bootNetCluster, NET_MODE } from './scenarios.ts';

/**
 * A relay that stops reading (issue 16): the destination's sidecar does not read QEMU's
 * out socket until QEMU has queued more there than the kernel's default send buffer holds
 * (faults relay-pause-bytes and relay-pause-ms, from the first read after checkpoint
 * PAUSE_EPOCH was sealed) while the client pings the guest (1400 bytes every 2 ms,
 * from the start of the migration until the pause is over): the guest's kernel answers each, and QEMU writes the replies into that socket
 * with blocking writes from its main loop. With the kernel's default send buffer
 * (net.core.wmem_default) QEMU would block once ~60 replies were queued, and with it QMP
 * and the vCPUs. The relay raises the send buffer of QEMU's end to the gate's byte bound
 * (SO_SNDBUFFORCE via pidfd_getfd), so QEMU blocks only once the guest has queued that much
 * (docs/network.md "Bounds": stall <= max(0, N - bound / the guest's output rate)).
 *
 * Asserted on counts and relations, not on durations:
 *  - QEMU's end of the socket has the raised buffer (>= the gate's default byte bound);
 *  - checkpoints were taken while the relay did not read: every barrier is QMP `stop`,
 *    a query and `cont` to D's QEMU, so QMP answered during the pause;
 *  - the guest produced, and QEMU queued without blocking, more than the default send
 *    buffer takes: the bytes waiting in the socket when the relay read again;
 *  - afterwards the migration completes and the TCP conversation stayed verified.
 * The control (fault relay-sndbuf-default: the kernel's default buffer) must show the stall:
 * QEMU stopped at its buffer (queued <= the default buffer + one record), so the pause ran
 * to its longest without the main test's byte count ever being reached.
 * The pings sent (client → guest) never pass the relay; the client may not be able to send
 * TCP meanwhile (its retransmission timer fires without ACKs), ICMP needs no ACK.
 */
/**
 * The pause ends once QEMU has queued more than the default send buffer could ever hold
 * (relay-pause-bytes), so the raised buffer is shown holding more by construction, however
 * fast the guest answers; PAUSE_MS is only its longest (the control, whose QEMU stops at
 * its default buffer, runs to CONTROL_PAUSE_MS).
 */
const PAUSE_MS = 60_000;
const CONTROL_PAUSE_MS = 4000;
const PAUSE_EPOCH = 5;
/** More than the pings until the pause is over (the pinger is stopped then). */
const PINGS = 100_000;

const lines = (file: string, msg: string): Record<string, any>[] =>
  fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.includes(msg))
    .map((l) => JSON.parse(l) as Record<string, any>);

interface PauseRun {
  stop: Record<string, any>;
  again: Record<string, any>;
  outcome: unknown;
}

/** Boot, migrate, ping the guest through the relay's pause, read the fault's two log lines, complete. */
async function pauseRun(t: Test, control: boolean): Promise<PauseRun> {
  const { c, client } = await bootNetCluster(t, {
    faults: {
      destination:
        `relay-pause-ms=${control ? CONTROL_PAUSE_MS : PAUSE_MS},relay-pause-epoch=${PAUSE_EPOCH},` +
        `relay-pause-bytes=${qemuSendBuffer()}${control ? ',relay-sndbuf-default' : ''}`,
    },
    holdCompletion: true,
  });
  const drops0 = softnetDropped();
  const migrating = c.migrate();
  // pings every 2 ms from before the pause until after it: the guest answers throughout
  let pingOut = '';
  const pinger = execFile(
    'ip',
    ['netns', 'exec', c.clientNs, 'busybox', 'ping', '-q', '-c', String(PINGS), '-i', '0.002', '-s', '1400', '-W', '10', GUEST_IP],
    (_e, out, err) => (pingOut = String(out) + String(err)),
  );
  const pinged = new Promise<void>((res) => pinger.on('close', () => res()));
  t.teardown(() => void pinger.kill('SIGKILL'));
  await waitFor(() => lines(c.dst.daemonLog, 'fault injection: relay stops reading').length > 0, 'the relay to stop reading');
  await waitFor(
    () => lines(c.dst.daemonLog, 'fault injection: relay reads again').length > 0,
    'the relay to read again',
    PAUSE_MS + 60_000,
  );
  pinger.kill('SIGINT'); // busybox prints its summary
  await pinged;
  const stop = lines(c.dst.daemonLog, 'fault injection: relay stops reading')[0]!;
  const again = lines(c.dst.daemonLog, 'fault injection: relay reads again')[0]!;
  t.comment(`pause: ${JSON.stringify(stop)} / ${JSON.stringify(again)}`);
  t.comment(`ping: ${pingOut.trim().split('\n').slice(-2).join(' / ')}; softnet backlog drops meanwhile: ${softnetDropped() - drops0}`);
  c.releaseCompletion();
  const mig = await migrating;
  const m = c.metrics(c.dst);
  const refused = Number(/^tether_nic_frames_dropped_total\{[^}]*reason="gate_full"[^}]*\} (\d+)$/m.exec(m)?.[1] ?? 0);
  t.equal(refused, 0, 'nothing was refused at the bound');
  t.equal(mig.result?.outcome, 'completed', `migration completes: ${mig.stderr.slice(-1500)}`);
  await waitFor(() => client.answers(Date.now() - 1000).length > 0, 'answers after the pause');
  t.same(client.violations, [], 'the TCP conversation stayed verified');
  return { stop, again, outcome: mig.result?.outcome };
}

const skip = NET_MODE !== 'gate' ? 'needs the gate' : false;
let raised: PauseRun | undefined;

t.test("a relay that stops reading: QMP answers and QEMU queues the guest's replies beyond the default buffer", { skip }, async (t) => {
  const r = (raised = await pauseRun(t, false));
  const bound = gateDefaults(gateReserve()).maxBytes;
  t.ok(r.stop.qemuSndbuf >= bound, `QEMU's end of the out socket has the raised send buffer (${r.stop.qemuSndbuf} >= ${bound})`);
  t.ok(
    r.again.epochTo > r.again.epochFrom,
    `checkpoints ${r.again.epochFrom}..${r.again.epochTo - 1} were taken while the relay did not read: QMP answered`,
  );
  t.ok(
    r.again.queued > qemuSendBuffer(),
    `QEMU had queued ${r.again.queued} bytes of the guest's replies when the relay read again, more than the default send buffer (${qemuSendBuffer()}) takes before QEMU blocks`,
  );
});

t.test('control: with the default send buffer the same pause blocks QEMU', { skip }, async (t) => {
  const r = await pauseRun(t, true);
  t.equal(r.stop.qemuSndbuf, 0, "QEMU's buffer was left at the kernel default");
  t.ok(
    r.again.queued <= gateReserve().bytes,
    `QEMU stopped writing at its buffer: ${r.again.queued} bytes queued <= the default buffer + one record (${gateReserve().bytes})`,
  );
  // the main test's check, which must report the violation here
  t.ok(
    r.again.queued <= qemuSendBuffer(),
    `never more than the default send buffer queued (${r.again.queued} <= ${qemuSendBuffer()}), so the pause ran its full ${r.again.pausedMs} ms`,
  );
  const n = r.again.epochTo - r.again.epochFrom;
  const m = raised ? raised.again.epochTo - raised.again.epochFrom : NaN;
  t.comment(`checkpoints during the pause: ${n} in ${r.again.pausedMs} ms (raised buffer: ${m} in ${raised?.again.pausedMs} ms)`);
});
