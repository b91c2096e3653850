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
