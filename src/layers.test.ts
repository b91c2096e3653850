/**
 * No upward import and no import cycle inside src/: the `imports` and `cycles` rules of
 * tools/check-structure.ts (which holds the layer order, lowest first) over this tree. The
 * test prints every offending import as `file:line what`.
 */
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { checkTree } from '../tools/check-structure.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');

for (const rule of ['imports', 'cycles'] as const) {
  t.test(`structure rule ${rule}`, async (t) => {
    const bad = checkTree(ROOT, [rule]).map((v) => `${v.file}:${v.line} ${v.what}`);
    t.same(bad, [], `violations (layer order: tools/check-structure.ts):\n  ${bad.join('\n  ')}`);
  });
}
