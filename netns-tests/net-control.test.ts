import t from 'tap';
import { assertSurvivedOnSource, bootNetCluster, holdFault, interruptDuringHold, NET_MODE, wireCheck } from './scenarios.ts';

/** The control interrupts once answers got out during the hold; the hold outlasts that on a slow machine. */
const HOLD_MS = 30_000;

// CONTROL: the kill -9 scenario of net-rollback.test.ts with the destination's gate forced
// to pass-through (TETHER_FAULTS=gate-open). The client then receives answers of epochs
// the source never acknowledged, and the conversation must be observed to break: a
// chain mismatch, a counter regression, a stall or a lost connection. If this test
// fails, the checks of the other network scenarios could not fail either.
t.test('CONTROL: with the gate forced open, kill -9 of the destination QEMU breaks the conversation', async (t) => {
  const { c, client, wire } = await bootNetCluster(
    t,
    {
      // the destination must not fence itself during the hold
      vm: { fenceTimeoutMs: HOLD_MS + 5000, failoverTimeoutMs: HOLD_MS + 10_000 },
      faults: { source: holdFault(HOLD_MS), ...(NET_MODE === 'gate' ? { destination: 'gate-open' } : {}) },
      holdCompletion: true,
    },
    true,
  );
  const {
    mig,
    answersInHold: heldAnswers,
    holdEpoch,
  } = await interruptDuringHold(
    c,
    client,
    async () => {
      process.kill((await c.status(c.dst)).pid, 'SIGKILL');
    },
    { answersInHold: NET_MODE === 'gate' ? 1 : 0 },
  );
  // The VM itself survives (memory is checkpointed either way); only its outputs leaked.
  await assertSurvivedOnSource(t, c, mig, (e) => e >= holdEpoch);
  if (NET_MODE === 'gate') t.ok(heldAnswers > 0, `the open gate let out answers to queries sent while the ACK was held (${heldAnswers})`);
  const v = await client.waitEvent((e) => e.ev === 'violation', 'the client reporting a violation');
  t.pass(`the client reported: ${JSON.stringify(v)} (answers received during the hold: ${heldAnswers})`);
  if (wire) {
    // The wire check of the other scenarios must fail too: the open gate released nothing
    // on an ACK, yet the destination's frames reached the switch.
    const { check, fromDest } = wireCheck(c, wire);
    t.ok(
      check.violations.length > 0,
      `the capture shows frames of unacknowledged epochs: ${check.violations.length} of ${fromDest}, e.g. ${check.violations[0]}`,
    );
  }
});
