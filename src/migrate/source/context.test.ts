import t from 'tap';
import { LIVE_PHASES, SOURCE_TRANSITIONS } from './context.ts';
import type { SourcePhase } from './context.ts';

const phases = Object.keys(SOURCE_TRANSITIONS) as SourcePhase[];
const live = new Set<SourcePhase>(LIVE_PHASES);

t.test('a decision is taken once: leaving the live phases never leads back to one', async (t) => {
  for (const p of phases.filter((p) => !live.has(p))) {
    for (const next of SOURCE_TRANSITIONS[p]) t.notOk(live.has(next), `${p} -> ${next} stays decided`);
  }
});

t.test('every live phase can roll back and detach (sidecar shutdown)', async (t) => {
  for (const p of LIVE_PHASES) {
    t.ok(SOURCE_TRANSITIONS[p].includes('rolling-back'), `${p} -> rolling-back`);
    t.ok(SOURCE_TRANSITIONS[p].includes('detached'), `${p} -> detached`);
  }
});

t.test('completion is asked for only in post-copy, and a failed record rolls back', async (t) => {
  t.same(
    phases.filter((p) => SOURCE_TRANSITIONS[p].includes('completing')),
    ['postcopy'],
  );
  t.same([...SOURCE_TRANSITIONS.completing].sort(), ['completed', 'rolling-back']);
  t.same(SOURCE_TRANSITIONS.detached, [], 'detached is final: the next start resolves the migration');
});
