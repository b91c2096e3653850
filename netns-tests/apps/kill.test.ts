/**
 * kill -9 of the destination's QEMU in post-copy with the three services of the Debian
 * guest in use (docs/apps.md; the scenario is killWithAllApps in cases.ts, which `npm test`
 * also runs through netns-tests/apps-core.test.ts).
 */
import t from 'tap';
import { killWithAllApps } from './cases.ts';

t.test(
  'kill -9 of the destination QEMU in post-copy: every acknowledged commit, STORED key, read and downloaded byte survives',
  killWithAllApps,
);
