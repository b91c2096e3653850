/**
 * The structure checker's rules on small fixture trees written to a temporary directory:
 * each rule reports a planted violation (with its file and line) and passes on clean input.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import t, { type Test } from 'tap';
import {
  checkCycles,
  checkFaultReads,
  checkFileSizes,
  checkFunctionSizes,
  checkImports,
  checkSilentCatches,
  checkTree,
  checkUncodedErrors,
  importsOf,
  listSources,
  parseArgs,
  summarise,
  UsageError,
  type Source,
} from './check-structure.ts';

/** Writes `files` (path -> text) under a fresh temporary root; removed after the test. */
function tree(t: Test, files: Record<string, string>): string {
  const root = mkdtempSync(join(tmpdir(), 'check-structure-'));
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  for (const [p, text] of Object.entries(files)) {
    mkdirSync(dirname(join(root, p)), { recursive: true });
    writeFileSync(join(root, p), text);
  }
  return root;
}

const LAYERS = [['errors'], ['util'], ['epoch'], ['memory'], ['peer']] as const;

/** A clean tree: every rule passes on it. */
const CLEAN: Record<string, string> = {
  'src/errors.ts': "export class TetherError extends Error {}\nexport const code = 'ERR_X';\n",
  'src/util/log.ts':
    "import { TetherError } from '../errors.ts';\nexport function ignored(): (e: unknown) => void {\n  return () => void TetherError;\n}\n",
  'src/epoch/outputs.ts':
    "import type { TetherError } from '../errors.ts';\nexport interface Outputs { seal(): TetherError | undefined }\n",
  'src/memory/dirty-tracker.ts': 'export interface DirtyTracker { collect(): number }\n',
  'src/memory/scan.ts':
    "import type { DirtyTracker } from './dirty-tracker.ts';\nexport const scan: DirtyTracker = { collect: () => 1 };\n",
  'src/memory/select.ts': "import { scan } from './scan.ts';\nexport const pick = () => scan;\n",
  'src/peer/faults.ts': 'export const faults = process.env.TETHER_FAULTS;\n',
  'src/peer/channel.ts':
    "import { ignored } from '../util/log.ts';\nimport { pick } from '../memory/select.ts';\nexport function run(p: Promise<void>): void {\n  p.catch(ignored());\n  pick();\n}\n",
  'src/peer/channel.test.ts': "process.env.TETHER_FAULTS = 'x';\nthrow new Error('tests may throw plain errors');\n",
  'tools/x.ts': 'export const y = 1;\n',
};

function sources(root: string): Source[] {
  return listSources(root, 'src');
}

t.test('clean input passes every rule', async (t) => {
  const root = tree(t, CLEAN);
  const src = sources(root);
  t.same(checkImports(src, LAYERS), []);
  t.same(checkCycles(src), []);
  t.same(checkFileSizes(src), []);
  t.same(checkFunctionSizes(src), []);
  t.same(checkSilentCatches([...src, ...listSources(root, 'tools')]), []);
  t.same(checkFaultReads(src), []);
  t.same(checkUncodedErrors(src), []);
  t.same(checkTree(root, ['cycles', 'size', 'functions', 'catch', 'faults', 'throws']), [], 'checkTree reads src/ and tools/ of the root');
});

t.test('imports: an upward import fails, type-only and export-from included', async (t) => {
  const root = tree(t, {
    ...CLEAN,
    'src/epoch/outputs.ts': "import type { DirtyTracker } from '../memory/dirty-tracker.ts';\nexport type X = DirtyTracker;\n",
    'src/util/log.ts': "export { pick } from '../peer/../memory/select.ts';\n",
  });
  const v = checkImports(sources(root), LAYERS);
  t.same(
    v.map((x) => `${x.file}:${x.line} ${x.what}`),
    [
      'src/epoch/outputs.ts:1 upward import: epoch imports memory (src/memory/dirty-tracker.ts)',
      'src/util/log.ts:1 upward import: util imports memory (src/memory/select.ts)',
    ],
  );
  t.ok(v.every((x) => x.rule === 'imports'));
});

t.test('imports: a sibling on the same layer, and a unit without a layer, fail', async (t) => {
  const root = tree(t, { ...CLEAN, 'src/extra/x.ts': "import { scan } from '../memory/scan.ts';\nexport const x = scan;\n" });
  const v = checkImports(sources(root), [['errors'], ['util', 'epoch'], ['memory'], ['peer']]);
  t.match(v.map((x) => x.what).join('\n'), /unit extra has no layer/);
  t.same(
    checkImports(
      sources(tree(t, { ...CLEAN, 'src/util/x.ts': "import type { Outputs } from '../epoch/outputs.ts';\nexport type Y = Outputs;\n" })),
      [['errors'], ['util', 'epoch'], ['memory'], ['peer']],
    ).map((x) => x.what),
    ['upward import: util imports epoch (src/epoch/outputs.ts)'],
  );
});

t.test('importsOf sees static, export-from, dynamic and import-type specifiers', async (t) => {
  const s: Source = {
    path: 'src/a/b.ts',
    text: "import x from './c.ts';\nexport * from '../d/e.ts';\nconst f = await import('../g.ts');\ntype H = import('./h.ts').H;\nimport fs from 'node:fs';\n",
  };
  t.same(
    importsOf(s).map((e) => `${e.line} ${e.to}`),
    ['1 src/a/c.ts', '2 src/d/e.ts', '3 src/g.ts', '4 src/a/h.ts'],
  );
});

t.test('cycles: between files of a folder, and between folders', async (t) => {
  const fileCycle = tree(t, {
    ...CLEAN,
    'src/memory/scan.ts': "import { pick } from './select.ts';\nexport const scan = { collect: () => 1 };\nexport const again = pick;\n",
  });
  const v = checkCycles(sources(fileCycle));
  t.same(
    v.map((x) => `${x.file}:${x.line}`),
    ['src/memory/scan.ts:1', 'src/memory/select.ts:1'],
  );
  t.match(v[0]!.what, /file cycle src\/memory\/scan\.ts <-> src\/memory\/select\.ts/);

  const folderCycle = tree(t, {
    ...CLEAN,
    'src/memory/dirty-tracker.ts':
      "import type { run } from '../peer/channel.ts';\nexport interface DirtyTracker { collect(): number; r?: typeof run }\n",
  });
  const w = checkCycles(sources(folderCycle));
  t.ok(w.length >= 2, 'both directions of the folder cycle are named');
  t.ok(w.every((x) => /folder cycle memory <-> peer/.test(x.what)));
});

t.test('size: a file over the limit fails, tests are not counted', async (t) => {
  const long = Array.from({ length: 12 }, (_, i) => `export const v${i} = ${i};`).join('\n') + '\n';
  const root = tree(t, { ...CLEAN, 'src/peer/long.ts': long, 'src/peer/long.test.ts': long, 'src/peer/rig.test-util.ts': long });
  const v = checkFileSizes(sources(root), 10);
  t.same(
    v.map((x) => `${x.file} ${x.what}`),
    ['src/peer/long.ts 12 lines (max 10)'],
  );
});

t.test('functions: a long method, arrow function and accessor fail, a short one passes', async (t) => {
  const body = (n: number) => Array.from({ length: n }, (_, i) => `    x += ${i};`).join('\n');
  const root = tree(t, {
    ...CLEAN,
    'src/peer/long.ts': [
      'export class Long {',
      '  method(): number {',
      '    let x = 0;',
      body(6),
      '    return x;',
      '  }',
      '  short(): number {',
      '    return 1;',
      '  }',
      '  get value(): number {',
      '    let x = 0;',
      body(6),
      '    return x;',
      '  }',
      '}',
      'export const arrow = (): number => {',
      '  let x = 0;',
      body(6),
      '  return x;',
      '};',
      '',
    ].join('\n'),
  });
  const v = checkFunctionSizes(sources(root), 8);
  t.same(
    v.map((x) => `${x.file}:${x.line} ${x.what}`),
    [
      'src/peer/long.ts:2 method: 10 lines (max 8)',
      'src/peer/long.ts:15 get value: 10 lines (max 8)',
      'src/peer/long.ts:26 arrow: 10 lines (max 8)',
    ],
  );
});

t.test('catch: empty handlers fail in src/, tests and tools/', async (t) => {
  const root = tree(t, {
    ...CLEAN,
    'src/peer/swallow.ts':
      'export function f(p: Promise<void>): void {\n  p.catch(() => {});\n  p.then(() => 1, () => undefined);\n  p.catch((e) => console.error(e));\n}\n',
    'src/peer/swallow.test.ts': 'Promise.resolve().catch(() => {});\n',
    'tools/bench/x.ts': 'export const y = Promise.resolve().catch(function () {});\n',
  });
  const v = checkSilentCatches([...sources(root), ...listSources(root, 'tools')]);
  t.same(
    v.map((x) => `${x.file}:${x.line}`),
    ['src/peer/swallow.test.ts:1', 'src/peer/swallow.ts:2', 'src/peer/swallow.ts:3', 'tools/bench/x.ts:1'],
  );
  t.same(checkTree(root, ['catch']).length, 4, 'checkTree reads src/ and tools/ for this rule');
});

t.test('faults: TETHER_FAULTS read in two files fails, nowhere fails, writes do not count', async (t) => {
  const two = tree(t, { ...CLEAN, 'src/memory/faults.ts': "export const f = process.env['TETHER_FAULTS'] ?? '';\n" });
  const v = checkFaultReads(sources(two));
  t.same(
    v.map((x) => `${x.file}:${x.line}`),
    ['src/memory/faults.ts:1', 'src/peer/faults.ts:1'],
  );
  const none = tree(t, { ...CLEAN, 'src/peer/faults.ts': "process.env.TETHER_FAULTS = '';\nexport const faults = '';\n" });
  t.match(checkFaultReads(sources(none))[0]!.what, /read nowhere/);
});

t.test('throws: plain Error, RangeError and TypeError in src/ fail', async (t) => {
  const root = tree(t, {
    ...CLEAN,
    'src/peer/bad.ts':
      "export function f(n: number): void {\n  if (n < 0) throw new RangeError('negative');\n  if (n > 9) throw new Error('big');\n  Promise.reject(new TypeError('t'));\n}\n",
  });
  const v = checkUncodedErrors(sources(root));
  t.same(
    v.map((x) => `${x.file}:${x.line}`),
    ['src/peer/bad.ts:2', 'src/peer/bad.ts:3', 'src/peer/bad.ts:4'],
  );
});

t.test('summary and arguments', async (t) => {
  const s = summarise(
    [
      { rule: 'size', file: 'a.ts', line: 1, what: '' },
      { rule: 'catch', file: 'a.ts', line: 2, what: '' },
    ],
    ['size', 'catch', 'throws'],
  );
  t.same(s, { total: 2, byRule: { size: 1, catch: 1, throws: 0 }, byFile: { 'a.ts': 2 } });
  const root = tree(t, CLEAN);
  t.same(parseArgs(['--only', 'imports,size', '--json', '--root', root]), { rules: ['imports', 'size'], json: true, root });
  t.throws(() => parseArgs(['--only', 'nope']), UsageError);
  t.throws(() => parseArgs(['--bogus']), UsageError);
});
