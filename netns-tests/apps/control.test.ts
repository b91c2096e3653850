/**
 * CONTROL for kill.test.ts and rollback.test.ts (docs/apps.md; the scenario is
 * controlGateOpen in cases.ts, which `npm test` also runs through
 * netns-tests/apps-core.test.ts).
 */
import t from 'tap';
import { controlGateOpen } from './cases.ts';

t.test(
  'CONTROL: with the gate forced open, a commit, a STORED key and a read acknowledged in post-copy are undone by the rollback',
  controlGateOpen,
);

// The same control for the other interruptions of rollback.test.ts: each must report what
// its gated twin proves cannot happen.
t.test('CONTROL, migration link cut: with the gate forced open, acknowledged operations are undone by the rollback', (t) =>
  controlGateOpen(t, (c) => c.linkDown(), true),
);

t.test("CONTROL, kill -9 of the destination's sidecar: with the gate forced open, acknowledged operations are undone", (t) =>
  controlGateOpen(t, (c) => c.killDaemon(c.dst), true),
);

t.test('CONTROL, tether abort: with the gate forced open, acknowledged operations are undone by the rollback', (t) =>
  controlGateOpen(t, async (c) => {
    const a = await c.tether(c.src, ['abort', c.vmName]);
    t.equal(a.code, 0, `abort accepted: ${a.stderr}`);
  }),
);
