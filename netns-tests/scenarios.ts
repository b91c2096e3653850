/**
 * Shared steps of the migration scenarios: boot the memcheck guest on the
 * source, migrate, interrupt, and check the guest's own verdict on its memory.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Test } from 'tap';
import { Cluster, waitApplied } from '../lab/cluster.ts';
import { diskcheck, memcheck, waitDiskPasses, waitFsRounds, waitPasses } from '../lab/serial.ts';
import { fileSize, qemuAlive, waitFor } from '../lab/proc.ts';
import { SWITCH_PORT_D, SWITCH_PORT_S } from '../lab/topology.ts';
import { callDaemon } from '../src/control/client.ts';
import { HOLD_ACKS_TRIGGER } from '../src/migrate/faults.ts';
import { checkAgainstGate, readGateLog } from '../lab/wire/wirecap.ts';
import type { GateCheck, WireCapture } from '../lab/wire/wirecap.ts';
import type { ClusterOptions, Host } from '../lab/topology.ts';
import type { NetClient } from '../lab/net/driver.ts';

export async function bootCluster(t: Test, opts: ClusterOptions = {}): Promise<Cluster> {
  const c = new Cluster(opts);
  t.teardown(() => c.cleanup());
  await c.up();
  const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
  t.equal(r.code, 0, `vm start: ${r.stderr}`);
  // memcheck has filled its buffer: from here on every page it visits is verified against
  // the previous pass, so the invariant is live (pass 2 runs while the test migrates).
  await waitPasses(c.serialLog(c.src), 0, 1, 'on the source before migrating');
  return c;
}

/**
 * After a rollback: the VM runs on the source again and memcheck keeps
 * verifying every page, with no corruption on either host.
 */
export async function assertSurvivedOnSource(
  t: Test,
  c: Cluster,
  mig: { code: number | null; result: Record<string, any> | null; stderr: string },
  expectEpoch?: (epoch: number) => boolean,
): Promise<void> {
  t.equal(mig.code, 3, `migrate exits 3 (rolled back): ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'rolled-back', 'outcome rolled-back');
  if (mig.result?.outcome !== 'rolled-back') return; // nothing below can hold; do not wait for it
  const epoch = mig.result?.rollback?.epoch;
  t.type(epoch, 'number', 'resumed from a checkpoint');
  if (expectEpoch) t.ok(expectEpoch(epoch), `resumed from checkpoint ${epoch}`);
  const s = await c.status(c.src);
  t.equal(s.state, 'running', 'VM is running on the source');
  t.ok(qemuAlive(s.pid), 'source QEMU process is alive');
  // Two more completed passes after the rollback: the second one verified every page
  // of state that came back from the destination's checkpoints.
  const from = fileSize(c.serialLog(c.src));
  const after = await waitPasses(c.serialLog(c.src), from, 2, 'on the source after rollback');
  t.same(after.corrupt, [], 'no CORRUPT after rollback');
  t.ok(after.passes.length >= 2, `memcheck advanced: passes ${after.passes.join(',')}`);
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT anywhere in the source serial log');
  t.same(memcheck(c.serialLog(c.dst)).corrupt, [], 'no CORRUPT in the destination serial log');
  await assertNotRunningOn(t, c, c.dst);
}

export async function assertNotRunningOn(t: Test, c: Cluster, h: Host): Promise<void> {
  await waitFor(
    async () => {
      const s = await c.status(h);
      return s.state !== 'running' && s.state !== 'migrating-in';
    },
    `VM stopped on ${h.name}`,
    60_000,
  );
  const s = await c.status(h);
  t.notOk(qemuAlive(s.pid), `no QEMU for the VM on ${h.name} (state ${s.state})`);
}

/**
 * Boot a cluster whose guest has a NIC and runs netcheck, start a verifying client and
 * wait until the conversation is verified (memcheck running too). With `capture` (gate
 * mode only) the gates write their release logs and the client side captures the wire
 * from before the migration on (see assertWireClean).
 */
export async function bootNetCluster(
  t: Test,
  opts: ClusterOptions = {},
  capture = false,
): Promise<{ c: Cluster; client: NetClient; wire: WireCapture | undefined }> {
  const withCapture = capture && NET_MODE === 'gate';
  const c = await bootCluster(t, {
    guestNet: NET_MODE,
    ...opts,
    ...(withCapture ? { env: { ...opts.env, TETHER_GATE_LOG: '1' } } : {}),
  });
  await waitFor(() => /netcheck listening/.test(readText(c.serialLog(c.src))), 'netcheck listening in the guest');
  const wire = withCapture ? await c.capture() : undefined;
  const client = c.netclient();
  await client.waitAnswers(10, 'before migrating');
  t.same(client.violations, [], 'conversation verified before migrating');
  return { c, client, wire };
}

/**
 * Compare the client-side capture with the destination gate's release log
 * (checkAgainstGate in wirecap.ts): no frame of the VM left the destination before its
 * epoch was acknowledged, none after the fence. Returns the check for further asserts.
 */
export function wireCheck(c: Cluster, wire: WireCapture): { check: GateCheck; fromSource: number; fromDest: number } {
  const frames = wire.frames();
  const fromD = frames.filter((f) => f.port === SWITCH_PORT_D);
  const log = readGateLog(path.join(c.dst.stateDir, c.vmName, 'net0.gate.jsonl'));
  return {
    check: checkAgainstGate(fromD, log),
    fromSource: frames.filter((f) => f.port === SWITCH_PORT_S).length,
    fromDest: fromD.length,
  };
}

export function assertWireClean(t: Test, c: Cluster, wire: WireCapture | undefined, what: string): GateCheck | undefined {
  if (!wire) return undefined;
  const { check, fromSource, fromDest } = wireCheck(c, wire);
  t.ok(fromSource > 0, `the capture saw the source's frames (${fromSource})`);
  t.same(check.violations.slice(0, 20), [], `wire: no frame left the destination before its ACK or after its fence (${what})`);
  t.comment(
    `wire: ${fromDest} frames from the destination: ${check.released} released after their ACK, ${check.passed} after completion, ${check.afterFence} after the fence`,
  );
  return check;
}

/** NIC backend of the network scenarios: the gate (TETHER_TEST_NIC=qemu-tap for the ungated baseline). */
export const NET_MODE: 'gate' | 'qemu-tap' = process.env.TETHER_TEST_NIC === 'qemu-tap' ? 'qemu-tap' : 'gate';

function readText(p: string): string {
  try {
    return fs.readFileSync(p, 'latin1');
  } catch {
    return '';
  }
}

/**
 * After a rollback or completion: the same connection keeps answering, verified, and no
 * violation was ever reported.
 */
export async function assertConversationContinues(t: Test, client: NetClient, what: string): Promise<void> {
  const since = Date.now();
  await client.waitAnswers(20, what, since);
  t.same(client.violations, [], `no violation: ${what}`);
  t.equal(client.events.filter((e) => e.ev === 'hello').length, 1, 'one connection, one greeting');
  t.notOk(client.exited, 'the client is still connected');
}

/**
 * Faults for the network rollback scenarios: once the test creates the trigger file, the
 * source withholds the ACK of the next checkpoint it applies (and later ones) for HOLD_MS,
 * so the destination's guest runs on with all of its output held by the gate; the
 * interruption lands inside that hold. The destination never asks to complete
 * (holdCompletion), so the migration is still open whenever the test gets there. The
 * hold is long, so that a slow machine reaches the interruption inside it: the
 * interruption ends it (a decision of the source wakes it). The destination fences a
 * checkpoint unacknowledged for failoverTimeoutMs, so that stays above the hold (the
 * source's lease, which detects a link cut, is the same timeout).
 */
export const HOLD_MS = 20_000;
export const holdFault = (ms: number): string => `hold-acks-ms=${ms},hold-acks-epoch=1,hold-acks-trigger`;
export const NET_HOLD: ClusterOptions = {
  vm: { failoverTimeoutMs: HOLD_MS + 5000 },
  faults: { source: holdFault(HOLD_MS) },
  holdCompletion: true,
};
/** Answers from the destination's guest, released on ACKs, seen before the hold is armed. */
const LIVE_ANSWERS = 3;
/** Frames the destination's gate holds in the held epochs (the guest's answers) before the interruption. */
export const HELD_FRAMES = 3;

/**
 * Arm the source's ACK hold (a hold-acks-trigger fault) and return the checkpoint it holds:
 * the one the source names in its log line when the hold arms (the first it applied after
 * the trigger file existed). Applies wait behind it, so the applied epoch stays there
 * while it lasts.
 */
export async function armAckHold(c: Cluster, migrating: Promise<unknown>): Promise<number> {
  const from = fileSize(c.src.daemonLog);
  fs.writeFileSync(path.join(c.src.stateDir, c.vmName, HOLD_ACKS_TRIGGER), '');
  let ended = false;
  void migrating.finally(() => (ended = true));
  let epoch: number | undefined;
  await waitFor(async () => {
    if (ended) throw new Error(`the migration ended before the ACK hold armed: ${JSON.stringify(await migrating)}`);
    epoch = holdLine(c.src.daemonLog, from)?.epoch;
    return epoch !== undefined;
  }, "the source's ACK hold armed");
  return epoch!;
}

/** The source's "fault injection: holding ACK" log record after byte `from`. */
function holdLine(log: string, from: number): { epoch: number } | undefined {
  const text = fs.readFileSync(log).subarray(from).toString('utf8');
  for (const l of text.split('\n')) {
    if (!l.includes('fault injection: holding ACK')) continue;
    try {
      return JSON.parse(l) as { epoch: number };
    } catch {
      /* a line still being written */
    }
  }
  return undefined;
}

/** Frames the destination's gate of net0 holds now (its metrics). */
export function heldFrames(c: Cluster): number {
  const m = /^tether_gate_held_frames\{[^}]*nic="net0"[^}]*\} (\d+)$/m.exec(c.metrics(c.dst));
  return m ? Number(m[1]) : 0;
}

/**
 * The first half of every hold scenario: migrate; once the guest is seen working on the
 * destination (`live(since)` true for what it did since the first ACK; right after
 * switchover it waits seconds for post-copy page faults, and a hold then would test
 * nothing), arm the source's ACK hold and wait until the destination has processed the last
 * ACK before it. `notEnded` throws once the migration has ended: a scenario that did not
 * reach its interruption point fails instead of testing nothing.
 */
export async function migrateIntoHold(
  c: Cluster,
  live: (since: number) => boolean,
  liveWhat: string,
): Promise<{ migrating: ReturnType<Cluster['migrate']>; holdEpoch: number; notEnded: (what: string) => void }> {
  const migrating = c.migrate();
  let ended = false;
  void migrating.finally(() => (ended = true));
  const notEnded = (what: string): void => {
    if (ended) throw new Error(`the migration ended ${what}`);
  };
  await waitFor(async () => {
    notEnded('before the first checkpoint was acknowledged');
    return ((await c.status(c.dst)).migration?.ackedEpoch ?? 0) >= 1;
  }, 'the first checkpoint acknowledged');
  const onDest = Date.now();
  await waitFor(() => {
    notEnded('before the guest worked on the destination');
    return live(onDest);
  }, liveWhat);
  const holdEpoch = await armAckHold(c, migrating);
  await waitFor(
    async () => {
      notEnded('during the hold');
      return ((await c.status(c.dst)).migration?.ackedEpoch ?? 0) >= holdEpoch - 1;
    },
    `ACK(${holdEpoch - 1}) processed on the destination`,
  );
  return { migrating, holdEpoch, notEnded };
}

/**
 * Migrate (with NET_HOLD); once the destination's guest is seen answering (right after
 * switchover it waits seconds for post-copy page faults and answers nothing, and a hold
 * then would test nothing), arm the source's ACK hold and wait until the destination has
 * processed the last ACK before it: from then on every frame its gate holds belongs to a
 * held epoch. Then wait until the guest has answered in those epochs — HELD_FRAMES frames
 * held by the gate, or with the gate forced open (`answersInHold`, a control) that many
 * answers at the client — and `interrupt`. Returns the migration result and the checkpoint
 * whose ACK was held; assertHoldKept checks afterwards, from the gate's log, that nothing
 * of the held epochs left.
 */
export async function interruptDuringHold(
  c: Cluster,
  client: NetClient,
  interrupt: () => void | Promise<void>,
  opts: { answersInHold?: number } = {},
): Promise<{ mig: Awaited<ReturnType<Cluster['migrate']>>; holdEpoch: number; answersInHold: number; interruptedAt: number }> {
  const { migrating, holdEpoch, notEnded } = await migrateIntoHold(
    c,
    (onDest) => client.answers(onDest).length >= LIVE_ANSWERS,
    `${LIVE_ANSWERS} answers from the destination's guest`,
  );
  const from = Date.now();
  const want = opts.answersInHold ?? 0;
  if (want > 0) {
    // A control: the gate forced open lets answers out during the hold. Only answers to
    // queries the client sent after `from` count: the held checkpoint had been taken by
    // then (the source applied it), so the guest answered them in a later epoch, which the
    // rollback takes back. An answer of the held epoch itself is consistent with the
    // checkpoint the source resumes from and could not show a violation.
    await waitFor(() => {
      notEnded('during the hold');
      return answersToQueriesSince(client, from) >= want;
    }, `${want} answers from the destination's guest to queries sent during the hold`);
  } else if (NET_MODE === 'gate') {
    await waitFor(() => {
      notEnded('during the hold');
      return heldFrames(c) >= HELD_FRAMES;
    }, `${HELD_FRAMES} frames of the held epochs in the destination's gate`);
  } else {
    // the ungated baseline: the guest answers straight to the client
    await waitFor(() => client.answers(from).length >= HELD_FRAMES, `${HELD_FRAMES} answers during the hold`);
  }
  const answersInHold = want > 0 ? answersToQueriesSince(client, from) : client.answers(from).length;
  const interruptedAt = monoNow();
  await interrupt();
  return { mig: await migrating, holdEpoch, answersInHold, interruptedAt };
}

/** CLOCK_MONOTONIC in ms, the clock of the wire capture's `mono`. */
const monoNow = (): number => Number(process.hrtime.bigint()) / 1e6;

/**
 * After a rollback the source's restored QEMU announces the VM's MAC (RARP, `announce-self`)
 * so the switch learns its port back from the destination's: at least one RARP of the guest's
 * MAC reaches the switch from the source's port after the interruption (`sinceMono`).
 */
export async function assertAnnouncedFromSource(t: Test, wire: WireCapture | undefined, sinceMono: number, what: string): Promise<void> {
  if (!wire) return;
  const rarps = () => wire.frames().filter((f) => f.port === SWITCH_PORT_S && f.type === '8035' && f.mono > sinceMono);
  // QEMU's announce rounds go on for a moment after the rollback has returned
  for (const until = Date.now() + 15_000; rarps().length === 0 && Date.now() < until;) await new Promise((r) => setTimeout(r, 100));
  t.ok(rarps().length > 0, `${what}: the switch got the source's RARP announce after the interruption (${rarps().length} captured)`);
}

/** Answers to queries the client sent at or after `since` (an answer's event time less its round trip). */
function answersToQueriesSince(client: NetClient, since: number): number {
  return client.answers(since).filter((e) => e.t - Number(e.rttMs ?? Infinity) >= since).length;
}

/**
 * After a rollback from interruptDuringHold (gate mode, with the gate's log and the
 * capture on): the hold as the destination's gate recorded it. No epoch from `holdEpoch`
 * on was ever released, the frames the guest produced in them (at least HELD_FRAMES) were
 * discarded by the fence, and every frame of the destination on the wire is one the gate
 * released for an earlier, acknowledged epoch: no answer of the held epochs reached the
 * client.
 */
export function assertHoldKept(t: Test, c: Cluster, wire: WireCapture | undefined, holdEpoch: number, what: string): void {
  if (NET_MODE !== 'gate') return;
  const log = readGateLog(path.join(c.dst.stateDir, c.vmName, 'net0.gate.jsonl'));
  const releasedHeld = log.filter((r) => r.t === 'release' && r.epoch >= holdEpoch);
  t.same(releasedHeld, [], `the gate released nothing from the held checkpoint ${holdEpoch} on`);
  const discarded = log
    .filter((r) => r.t === 'discard' && r.epoch >= holdEpoch)
    .reduce((n, r) => n + (r.t === 'discard' ? r.frames : 0), 0);
  t.ok(discarded >= HELD_FRAMES, `the fence discarded the ${discarded} frames of the held epochs`);
  const check = assertWireClean(t, c, wire, what);
  if (!check || !wire) return;
  const frames = wire.frames().filter((f) => f.port === SWITCH_PORT_D);
  const epochOf = new Map<string, number>();
  for (const r of log) if (r.t === 'release') for (const h of r.hashes) epochOf.set(h, Math.max(epochOf.get(h) ?? 0, r.epoch));
  const late = frames.filter((f) => (epochOf.get(f.hash) ?? 0) >= holdEpoch);
  t.same(late, [], 'no frame of a held epoch reached the client');
  t.ok(check.released > 0, `frames the destination released on ACKs before the hold were captured (${check.released})`);
}

/**
 * The disk kill -9 scenario (disk.test.ts, and its control disk-control.test.ts): a 1 s
 * checkpoint interval, and an ACK hold long enough for two diskcheck passes on the
 * destination on a slow machine; the destination must not fence itself during it. The
 * cluster needs holdCompletion: the destination must not ask to complete before the
 * kill. The kill cuts the hold short.
 */
const DISK_HOLD_MS = 60_000;
export const DISK_HOLD = {
  vm: { intervalMs: 1000, fenceTimeoutMs: DISK_HOLD_MS + 5000, failoverTimeoutMs: DISK_HOLD_MS + 10_000 },
  source: holdFault(DISK_HOLD_MS),
};

/**
 * Migrate; once the destination's guest writes, arm the source's ACK hold (DISK_HOLD) and
 * kill -9 the destination's QEMU after its guest completed a diskcheck pass that began
 * after the held checkpoint was taken. So the epochs that die with it hold writes on a
 * machine of any speed, and the source resumes from exactly the held checkpoint.
 */
export async function killDuringDiskHold(t: Test, c: Cluster): Promise<{ mig: Awaited<ReturnType<Cluster['migrate']>>; held: number }> {
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  // The guest is writing on the destination (a pass completed there since switchover).
  await waitDiskPasses(c.serialLog(c.dst), 0, 1, 'on the destination');
  const held = await armAckHold(c, migrating);
  // Every line the destination's serial log gets from here on was printed after checkpoint
  // `held` was taken: the pass after the next completed one wrote only in later epochs.
  const fromDst = fileSize(c.serialLog(c.dst));
  await waitDiskPasses(c.serialLog(c.dst), fromDst, 2, 'on the destination while the ACK is held');
  t.equal((await c.status(c.src)).migration?.appliedEpoch, held, `the source still holds at checkpoint ${held}`);
  const d = await c.status(c.dst);
  t.equal(d.state, 'migrating-in', 'destination VM is mid post-copy');
  process.kill(d.pid, 'SIGKILL');
  return { mig: await migrating, held };
}

/** Boot a VM with a disk (diskcheck or fsload in the guest) on the source and wait until its check is live. */
export async function bootDiskCluster(t: Test, opts: ClusterOptions & { disk: NonNullable<ClusterOptions['disk']> }): Promise<Cluster> {
  const c = new Cluster(opts);
  t.teardown(() => c.cleanup());
  await c.up();
  const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
  t.equal(r.code, 0, `vm start: ${r.stderr}`);
  if (opts.disk.guest === 'fsload') await waitFsRounds(c.serialLog(c.src), 0, 2, 'on the source before migrating');
  else {
    const rep = await waitDiskPasses(c.serialLog(c.src), 0, 2, 'on the source before migrating');
    t.same(rep.mismatch, [], 'diskcheck consistent before migrating');
  }
  return c;
}

/**
 * After a rollback of a diskcheck VM: the VM runs on the source again and two
 * more full diskcheck passes find every block as the guest's memory (of the
 * acknowledged checkpoint) says — the image holds exactly the writes of the
 * acknowledged epochs.
 */
export async function assertDiskSurvivedOnSource(
  t: Test,
  c: Cluster,
  mig: { code: number | null; result: Record<string, any> | null; stderr: string },
): Promise<void> {
  t.equal(mig.code, 3, `migrate exits 3 (rolled back): ${mig.stderr.slice(-2000)}`);
  t.equal(mig.result?.outcome, 'rolled-back', 'outcome rolled-back');
  if (mig.result?.outcome !== 'rolled-back') return;
  t.type(mig.result?.rollback?.epoch, 'number', 'resumed from a checkpoint');
  const s = await c.status(c.src);
  t.equal(s.state, 'running', 'VM is running on the source');
  const from = fileSize(c.serialLog(c.src));
  const after = await waitDiskPasses(c.serialLog(c.src), from, 2, 'on the source after rollback');
  t.same(after.mismatch, [], 'no MISMATCH after rollback');
  t.same(diskcheck(c.serialLog(c.src)).mismatch, [], 'no MISMATCH anywhere in the source serial log');
  t.same(diskcheck(c.serialLog(c.dst)).mismatch, [], 'no MISMATCH in the destination serial log');
  await assertNotRunningOn(t, c, c.dst);
}

/** The VM's disk on host `h` as `tether status <vm>` shows it: `window` (served by the sidecar) and QEMU's block nodes (node:driver). */
export async function diskNodes(c: Cluster, h: Host): Promise<{ window: boolean; nodes: string[] | null }> {
  const st = (await callDaemon(h.socket, 'status', { vm: c.vmName })) as { disk?: { window: boolean; nodes: string[] | null } };
  return st.disk ?? { window: false, nodes: null };
}

/**
 * After a completed migration: the destination's switch to QEMU's own file node follows the
 * source's answer, which `migrate` does not wait for; wait until QEMU reports the nodes of a
 * VM that runs there with its window closed.
 */
export async function waitDiskWindowClosed(c: Cluster): Promise<{ window: boolean; nodes: string[] | null }> {
  let d = await diskNodes(c, c.dst);
  await waitFor(
    async () => {
      d = await diskNodes(c, c.dst);
      return !d.window && d.nodes !== null;
    },
    'the destination disk window closed',
    60_000,
  );
  return d;
}
