/**
 * The real applications inside `npm test` (issue 14, docs/apps.md): one interruption with
 * memcached, PostgreSQL and nginx of the Debian guest in use at once — kill -9 of the
 * destination's QEMU in post-copy, each client checking its own guarantees — and its
 * control with the destination's gate forced open, which must report lost commits, lost
 * STORED keys and undone reads. The rest of the matrix (a completed migration, the link
 * cut, the sidecar's death, `tether abort`) is `npm run test:apps`.
 */
import t from 'tap';
import { controlGateOpen, killWithAllApps } from './apps/cases.ts';

t.test(
  'kill -9 of the destination QEMU in post-copy: every acknowledged commit, STORED key, read and downloaded byte survives',
  killWithAllApps,
);

t.test(
  'CONTROL: with the gate forced open, a commit, a STORED key and a read acknowledged in post-copy are undone by the rollback',
  controlGateOpen,
);
