import t from 'tap';
import { isMigrationId, MIGRATION_ID_RE, newMigrationId } from '../epoch/id.ts';
import { asPeerControl } from './control.ts';

const ID = newMigrationId();
const DIGEST = 'a'.repeat(64);

/** One valid body of each kind that names a migration. */
const bodies: Record<string, Record<string, unknown>> = {
  prepare: { kind: 'prepare', migrationId: ID, vm: 'vm1', deviceModel: DIGEST, sendConfiguration: true, failoverTimeoutMs: 3000 },
  complete: { kind: 'complete', migrationId: ID, finalEpoch: 7 },
  resolve: { kind: 'resolve', migrationId: ID, vm: 'vm1', outcome: 'rolled-back', epoch: 3 },
  resolved: { kind: 'resolved', migrationId: ID, known: false, code: 'ERR_MIGRATION_ID_MISMATCH' },
  hold: { kind: 'hold', migrationId: ID },
};

const badIds: unknown[] = [
  undefined,
  null,
  42,
  '',
  ID.toUpperCase(), // only the canonical lower-case form
  ID.replace(/-/g, ''), // 32 hex digits without the dashes
  ID + '0',
  ID.slice(0, 35),
  ` ${ID}`,
  `${ID}\n`,
  ID.replace(/^./, 'g'), // not hex
  '00000000-0000-0000-0000-000000000000', // not a random (version 4) UUID
  '../../../etc/passwd',
  'x'.repeat(100_000),
  [ID],
  { id: ID },
];

t.test('ids the source draws are valid and distinct', async (t) => {
  const seen = new Set<string>();
  for (let i = 0; i < 1000; i++) {
    const id = newMigrationId();
    t.ok(isMigrationId(id) && MIGRATION_ID_RE.test(id), id);
    seen.add(id);
  }
  t.equal(seen.size, 1000);
});

t.test('every message that names a migration is accepted with a valid id, refused without one', async (t) => {
  for (const [kind, body] of Object.entries(bodies)) {
    t.same(asPeerControl({ ...body }), body, `${kind} with a valid id`);
    const { migrationId: _, ...missing } = body;
    t.throws(() => asPeerControl(missing), { code: 'ERR_PEER_CONTROL' }, `${kind} without an id`);
    for (const bad of badIds) {
      t.throws(
        () => asPeerControl({ ...body, migrationId: bad }),
        { code: 'ERR_PEER_CONTROL' },
        `${kind} id ${JSON.stringify(bad)?.slice(0, 40)}`,
      );
    }
  }
});

t.test('resolve names a VM, resolved a catalogued code', async (t) => {
  t.throws(() => asPeerControl({ ...bodies.resolve, vm: '../vm1' }), { code: 'ERR_PEER_CONTROL' });
  t.throws(() => asPeerControl({ ...bodies.resolved, code: 'ERR_NOT_A_CODE' }), { code: 'ERR_PEER_CONTROL' });
  t.throws(() => asPeerControl({ ...bodies.resolved, code: 7 }), { code: 'ERR_PEER_CONTROL' });
  const { code: _, ...plain } = bodies.resolved!;
  t.same(asPeerControl({ ...plain, known: true }), { ...plain, known: true }, 'code is optional');
});
