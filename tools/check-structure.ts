/**
 * Structure checks over the source tree (issue 15, "Done when"): exits 1 on any violation
 * and prints each as `file:line what`, then a summary per rule and per file.
 *
 *   npx tsx tools/check-structure.ts [--only imports,cycles,size,functions,catch,faults,throws] [--json]
 *
 * Rules (src/ means its non-test .ts files: not *.test.ts, not *.test-util.ts):
 *   imports    no upward import in src/: a folder of src/ (or a top-level file) imports only
 *              from itself and from units on an earlier layer (type-only imports count)
 *   cycles     no import cycle between the folders of src/, nor between the files of one folder
 *   size       no file of src/ over MAX_FILE_LINES lines
 *   functions  no function, method, constructor, accessor, arrow function or function
 *              expression in src/ over MAX_FUNCTION_LINES lines (first line to closing brace)
 *   catch      no `.catch(() => {})` (or another empty handler) in src/, netns-tests/, tools/,
 *              tests included: a best-effort failure goes through ignored() of src/util/log.ts
 *   faults     process.env.TETHER_FAULTS is read in exactly one file of src/
 *   throws     no uncoded error in src/: `new Error(`, `new RangeError(`, `new TypeError(`
 *              (a TetherError with a code of src/errors.ts instead)
 *
 * Layer order, lowest first (a unit may import only the units listed before it, and itself):
 *   errors.ts    the error catalogue
 *   native.ts, util/  the addon loader; small helpers (log, state machine, time)
 *   epoch/       contracts shared by output commit and the migration: the outputs hook and
 *                the disk extents it returns, window limits, migration id
 *   gate/        the packet gate and its bound derivation (pure: frames held per epoch)
 *   config/      config loading; validates gate bounds and window limits against the layers
 *                that define them
 *   qmp/  qemu/  the QMP client, the QEMU process and its typed commands
 *   memory/      RAM file, dirty-page trackers
 *   net/         TAP devices, the NIC relay
 *   checkpoint/  checkpoint content: its messages and payload codec, assembler, stage, store
 *   disk/        block device, write journal, the image sink the checkpoint store applies to
 *   nbd/         the NBD server over disk/
 *   peer/        the authenticated peer channel: frame codec, handshake, control messages
 *   vm/          a VM instance: QEMU, disk, NBD, NICs together
 *   metrics/     the Prometheus registry; adapts the counter callbacks components define
 *   migrate/     source and destination migrations
 *   control/     the control RPC codec and client
 *   daemon/      the sidecar: control RPC, peer admission, recovery
 *   check/       the host check (`tether check`)
 *   cli/         the command line
 * Changes from the order first proposed in PLAN15 (each keeps the code where it is and says
 * what may depend on what): gate/ below config/ (gate/ depends on epoch/ and util/ only; the
 * config loader checks gate bounds with gate/reserve.ts as it checks the window with
 * epoch/limits.ts); checkpoint/ below disk/ (checkpoint/ depends on errors and epoch/ only;
 * disk/'s image sink implements the store's DiskSink, the journal cuts zero extents to
 * DISKZERO's limit); metrics/ above vm/ (components report through callbacks they define,
 * GateCounters and NicCounters, and never import metrics/; only migrate/ and daemon/ wire
 * the registry in); control/ below daemon/ (the daemon serves the codec the cli calls);
 * check/ below cli/ (the cli runs it). Units on one line of LAYERS are siblings: neither
 * imports the other.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, posix, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

export const LAYERS: readonly (readonly string[])[] = [
  ['errors'],
  ['native', 'util'],
  ['epoch'],
  ['gate'],
  ['config'],
  ['qmp'],
  ['qemu'],
  ['memory'],
  ['net'],
  ['checkpoint'],
  ['disk'],
  ['nbd'],
  ['peer'],
  ['vm'],
  ['metrics'],
  ['migrate'],
  ['control'],
  ['daemon'],
  ['check'],
  ['cli'],
];

export const MAX_FILE_LINES = 500;
export const MAX_FUNCTION_LINES = 80;

export const RULES = ['imports', 'cycles', 'size', 'functions', 'catch', 'faults', 'throws'] as const;
export type Rule = (typeof RULES)[number];

export interface Violation {
  rule: Rule;
  /** Path relative to the checked root, with `/`. */
  file: string;
  line: number;
  what: string;
}

/** A source file: its path relative to the root (with `/`) and its text. */
export interface Source {
  path: string;
  text: string;
}

const isTestPath = (p: string): boolean => /\.test(-util)?\.ts$/.test(p) || /\.test\.[a-z-]+\.ts$/.test(p);

/** Every .ts file under root/dir (recursively), relative to root, sorted. */
export function listSources(root: string, dir: string): Source[] {
  const out: Source[] = [];
  const walk = (abs: string): void => {
    let entries;
    try {
      entries = readdirSync(abs, { withFileTypes: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw e;
    }
    for (const e of entries) {
      const p = join(abs, e.name);
      if (e.isDirectory()) {
        if (e.name !== 'node_modules' && !e.name.startsWith('.')) walk(p);
      } else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) {
        out.push({ path: relative(root, p).split(sep).join('/'), text: readFileSync(p, 'utf8') });
      }
    }
  };
  walk(join(root, dir));
  return out.sort((a, b) => (a.path < b.path ? -1 : 1));
}

/** The non-test files of src/. */
export const productionSources = (all: readonly Source[]): Source[] => all.filter((s) => s.path.startsWith('src/') && !isTestPath(s.path));

function parse(s: Source): ts.SourceFile {
  return ts.createSourceFile(s.path, s.text, ts.ScriptTarget.ES2022, true, ts.ScriptKind.TS);
}

const lineOf = (sf: ts.SourceFile, pos: number): number => sf.getLineAndCharacterOfPosition(pos).line + 1;

function walk(node: ts.Node, visit: (n: ts.Node) => void): void {
  visit(node);
  node.forEachChild((c) => walk(c, visit));
}

// ---------------------------------------------------------------------------------------
// Imports and cycles

export interface ImportEdge {
  from: string;
  /** Resolved path relative to the root (relative specifiers only). */
  to: string;
  line: number;
}

/** Relative imports of a file: import/export ... from, import x = require(), import(). */
export function importsOf(s: Source): ImportEdge[] {
  const sf = parse(s);
  const edges: ImportEdge[] = [];
  const add = (spec: ts.Expression | undefined, at: ts.Node): void => {
    if (spec === undefined || !ts.isStringLiteralLike(spec) || !spec.text.startsWith('.')) return;
    const to = posix.normalize(posix.join(posix.dirname(s.path), spec.text));
    edges.push({ from: s.path, to, line: lineOf(sf, at.getStart(sf)) });
  };
  walk(sf, (n) => {
    if (ts.isImportDeclaration(n) || ts.isExportDeclaration(n)) add(n.moduleSpecifier, n);
    else if (ts.isImportEqualsDeclaration(n) && ts.isExternalModuleReference(n.moduleReference)) add(n.moduleReference.expression, n);
    else if (ts.isCallExpression(n) && n.expression.kind === ts.SyntaxKind.ImportKeyword) add(n.arguments[0], n);
    else if (ts.isImportTypeNode(n) && ts.isLiteralTypeNode(n.argument)) add(n.argument.literal as ts.Expression, n);
  });
  return edges;
}

/** The unit of a src/ path: its folder under src/, or a top-level file's name without .ts. */
export function unitOf(path: string): string | undefined {
  if (!path.startsWith('src/')) return undefined;
  const rest = path.slice(4);
  const slash = rest.indexOf('/');
  return slash >= 0 ? rest.slice(0, slash) : rest.replace(/\.ts$/, '');
}

function layerIndex(layers: readonly (readonly string[])[]): Map<string, number> {
  return new Map(layers.flatMap((units, i) => units.map((u) => [u, i] as const)));
}

/** Rule `imports`: every unit has a layer and imports only from itself and lower layers. */
export function checkImports(sources: readonly Source[], layers = LAYERS): Violation[] {
  const layer = layerIndex(layers);
  const out: Violation[] = [];
  const placed = new Set<string>();
  for (const s of productionSources(sources)) {
    const a = unitOf(s.path)!;
    if (!layer.has(a) && !placed.has(a)) {
      placed.add(a);
      out.push({ rule: 'imports', file: s.path, line: 1, what: `unit ${a} has no layer (add it to LAYERS in tools/check-structure.ts)` });
    }
    for (const e of importsOf(s)) {
      const b = unitOf(e.to);
      if (b === undefined) {
        out.push({ rule: 'imports', file: s.path, line: e.line, what: `imports ${e.to}, outside src/` });
        continue;
      }
      if (a === b) continue;
      const la = layer.get(a);
      const lb = layer.get(b);
      if (la === undefined || lb === undefined) continue;
      if (lb >= la) out.push({ rule: 'imports', file: s.path, line: e.line, what: `upward import: ${a} imports ${b} (${e.to})` });
    }
  }
  return out;
}

/** Strongly connected components with more than one node (Tarjan). */
export function cyclesOf(graph: ReadonlyMap<string, readonly string[]>): string[][] {
  let next = 0;
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const out: string[][] = [];
  const visit = (v: string): void => {
    index.set(v, next);
    low.set(v, next++);
    stack.push(v);
    onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!graph.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) !== index.get(v)) return;
    const scc: string[] = [];
    let w: string;
    do {
      w = stack.pop()!;
      onStack.delete(w);
      scc.push(w);
    } while (w !== v);
    if (scc.length > 1) out.push(scc.sort());
  };
  for (const v of [...graph.keys()].sort()) if (!index.has(v)) visit(v);
  return out;
}

/** Rule `cycles`: no cycle in the folder graph of src/, nor among the files of one folder. */
export function checkCycles(sources: readonly Source[]): Violation[] {
  const prod = productionSources(sources);
  const files = new Map<string, ImportEdge[]>(prod.map((s) => [s.path, importsOf(s)]));
  const units = new Map<string, Set<string>>();
  const firstEdge = new Map<string, ImportEdge>();
  for (const [f, edges] of files) {
    const a = unitOf(f)!;
    const set = units.get(a) ?? new Set<string>();
    units.set(a, set);
    for (const e of edges) {
      const b = unitOf(e.to);
      if (b === undefined || b === a) continue;
      set.add(b);
      if (!firstEdge.has(`${a}>${b}`)) firstEdge.set(`${a}>${b}`, e);
    }
  }
  const out: Violation[] = [];
  const unitGraph = new Map([...units].map(([u, s]) => [u, [...s]] as const));
  for (const scc of cyclesOf(unitGraph)) {
    const members = new Set(scc);
    const edges = [...firstEdge].filter(([k]) => members.has(k.split('>')[0]!) && members.has(k.split('>')[1]!)).map(([, e]) => e);
    for (const e of edges) {
      out.push({ rule: 'cycles', file: e.from, line: e.line, what: `folder cycle ${scc.join(' <-> ')}: imports ${e.to}` });
    }
  }
  const fileGraph = new Map(
    [...files].map(
      ([f, edges]) =>
        [f, edges.filter((e) => unitOf(e.to) === unitOf(f)).map((e) => (e.to.endsWith('.ts') ? e.to : `${e.to}.ts`))] as const,
    ),
  );
  for (const scc of cyclesOf(fileGraph)) {
    const members = new Set(scc);
    for (const f of scc) {
      for (const e of files.get(f)!) {
        if (members.has(e.to))
          out.push({ rule: 'cycles', file: f, line: e.line, what: `file cycle ${scc.join(' <-> ')}: imports ${e.to}` });
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Sizes

/** Rule `size`: no file of src/ over `max` lines. */
export function checkFileSizes(sources: readonly Source[], max = MAX_FILE_LINES): Violation[] {
  const out: Violation[] = [];
  for (const s of productionSources(sources)) {
    const lines = s.text.split('\n').length - (s.text.endsWith('\n') ? 1 : 0);
    if (lines > max) out.push({ rule: 'size', file: s.path, line: 1, what: `${lines} lines (max ${max})` });
  }
  return out;
}

function functionName(n: ts.Node, sf: ts.SourceFile): string {
  if (ts.isConstructorDeclaration(n)) return 'constructor';
  const named = n as ts.FunctionLikeDeclaration;
  if (named.name !== undefined) {
    const prefix = ts.isGetAccessor(n) ? 'get ' : ts.isSetAccessor(n) ? 'set ' : '';
    return prefix + named.name.getText(sf);
  }
  const p = n.parent;
  if (p !== undefined && (ts.isVariableDeclaration(p) || ts.isPropertyAssignment(p) || ts.isPropertyDeclaration(p))) {
    return p.name.getText(sf);
  }
  return ts.isArrowFunction(n) ? '(arrow function)' : '(function expression)';
}

/** Rule `functions`: no function-like body in src/ over `max` lines. */
export function checkFunctionSizes(sources: readonly Source[], max = MAX_FUNCTION_LINES): Violation[] {
  const out: Violation[] = [];
  for (const s of productionSources(sources)) {
    const sf = parse(s);
    walk(sf, (n) => {
      const fn =
        ts.isFunctionDeclaration(n) ||
        ts.isMethodDeclaration(n) ||
        ts.isConstructorDeclaration(n) ||
        ts.isArrowFunction(n) ||
        ts.isFunctionExpression(n) ||
        ts.isGetAccessor(n) ||
        ts.isSetAccessor(n);
      if (!fn || (n as ts.FunctionLikeDeclaration).body === undefined) return;
      const first = lineOf(sf, n.getStart(sf));
      const lines = lineOf(sf, n.getEnd()) - first + 1;
      if (lines > max)
        out.push({ rule: 'functions', file: s.path, line: first, what: `${functionName(n, sf)}: ${lines} lines (max ${max})` });
    });
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Swallowed errors, fault switches, uncoded errors

/** A handler that does nothing: `() => {}`, `() => undefined`, `() => void 0`, `() => null`. */
function isEmptyHandler(n: ts.Expression): boolean {
  if (!ts.isArrowFunction(n) && !ts.isFunctionExpression(n)) return false;
  const body = n.body;
  if (ts.isBlock(body)) return body.statements.length === 0;
  if (body.kind === ts.SyntaxKind.NullKeyword) return true;
  if (ts.isIdentifier(body) && body.text === 'undefined') return true;
  return ts.isVoidExpression(body) && ts.isLiteralExpression(body.expression);
}

/** Rule `catch`: no `.catch(<empty handler>)` and no `.then(x, <empty handler>)` anywhere given. */
export function checkSilentCatches(sources: readonly Source[]): Violation[] {
  const out: Violation[] = [];
  for (const s of sources) {
    if (!s.text.includes('catch') && !s.text.includes('then')) continue;
    const sf = parse(s);
    walk(sf, (n) => {
      if (!ts.isCallExpression(n) || !ts.isPropertyAccessExpression(n.expression)) return;
      const name = n.expression.name.text;
      const handler = name === 'catch' ? n.arguments[0] : name === 'then' ? n.arguments[1] : undefined;
      if (handler !== undefined && isEmptyHandler(handler)) {
        out.push({
          rule: 'catch',
          file: s.path,
          line: lineOf(sf, n.expression.name.getStart(sf)),
          what: `.${name}(${name === 'then' ? '..., ' : ''}${handler.getText(sf)}) swallows the error silently (use ignored(log, why))`,
        });
      }
    });
  }
  return out;
}

const isEnvFaults = (n: ts.Node): boolean => {
  const objectIsEnv = (e: ts.Expression) =>
    ts.isPropertyAccessExpression(e) && e.name.text === 'env' && e.expression.getText() === 'process';
  if (ts.isPropertyAccessExpression(n)) return n.name.text === 'TETHER_FAULTS' && objectIsEnv(n.expression);
  if (ts.isElementAccessExpression(n)) {
    const a = n.argumentExpression;
    return ts.isStringLiteralLike(a) && a.text === 'TETHER_FAULTS' && objectIsEnv(n.expression);
  }
  return false;
};

const isAssignedTo = (n: ts.Node): boolean =>
  ts.isBinaryExpression(n.parent) && n.parent.left === n && n.parent.operatorToken.kind === ts.SyntaxKind.EqualsToken;

/** Rule `faults`: process.env.TETHER_FAULTS is read in exactly one file of src/. */
export function checkFaultReads(sources: readonly Source[]): Violation[] {
  const reads: { file: string; line: number }[] = [];
  for (const s of productionSources(sources)) {
    if (!s.text.includes('TETHER_FAULTS')) continue;
    const sf = parse(s);
    walk(sf, (n) => {
      if (isEnvFaults(n) && !isAssignedTo(n)) reads.push({ file: s.path, line: lineOf(sf, n.getStart(sf)) });
    });
  }
  const files = new Set(reads.map((r) => r.file));
  if (files.size === 1) return [];
  if (files.size === 0)
    return [{ rule: 'faults', file: 'src', line: 0, what: 'process.env.TETHER_FAULTS is read nowhere in src/ (expected: one file)' }];
  return reads.map((r) => ({
    rule: 'faults',
    file: r.file,
    line: r.line,
    what: `process.env.TETHER_FAULTS read here; read in ${files.size} files (expected one)`,
  }));
}

const UNCODED = new Set(['Error', 'RangeError', 'TypeError']);

/** Rule `throws`: no `new Error(`/`new RangeError(`/`new TypeError(` in src/. */
export function checkUncodedErrors(sources: readonly Source[]): Violation[] {
  const out: Violation[] = [];
  for (const s of productionSources(sources)) {
    if (!/new (Range|Type)?Error\b/.test(s.text)) continue;
    const sf = parse(s);
    walk(sf, (n) => {
      if (ts.isNewExpression(n) && ts.isIdentifier(n.expression) && UNCODED.has(n.expression.text)) {
        out.push({
          rule: 'throws',
          file: s.path,
          line: lineOf(sf, n.getStart(sf)),
          what: `uncoded new ${n.expression.text}(...) (use a TetherError with a code of src/errors.ts)`,
        });
      }
    });
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Running

/** Folders the `catch` rule reads (tests included); the other rules read src/ only. */
export const CATCH_DIRS = ['src', 'netns-tests', 'tools'];

/** Runs the given rules over the tree at `root`. */
export function checkTree(root: string, rules: readonly Rule[] = RULES): Violation[] {
  const src = listSources(root, 'src');
  const out: Violation[] = [];
  for (const rule of rules) {
    if (rule === 'imports') out.push(...checkImports(src));
    else if (rule === 'cycles') out.push(...checkCycles(src));
    else if (rule === 'size') out.push(...checkFileSizes(src));
    else if (rule === 'functions') out.push(...checkFunctionSizes(src));
    else if (rule === 'catch') out.push(...checkSilentCatches(CATCH_DIRS.flatMap((d) => listSources(root, d))));
    else if (rule === 'faults') out.push(...checkFaultReads(src));
    else out.push(...checkUncodedErrors(src));
  }
  return out;
}

export interface Summary {
  total: number;
  byRule: Record<string, number>;
  byFile: Record<string, number>;
}

export function summarise(violations: readonly Violation[], rules: readonly Rule[] = RULES): Summary {
  const byRule: Record<string, number> = Object.fromEntries(rules.map((r) => [r, 0]));
  const byFile: Record<string, number> = {};
  for (const v of violations) {
    byRule[v.rule] = (byRule[v.rule] ?? 0) + 1;
    byFile[v.file] = (byFile[v.file] ?? 0) + 1;
  }
  return { total: violations.length, byRule, byFile };
}

export function parseArgs(argv: readonly string[]): { rules: Rule[]; json: boolean; root: string } {
  let rules: Rule[] = [...RULES];
  let json = false;
  let root = join(dirname(fileURLToPath(import.meta.url)), '..');
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = (): string => {
      const eq = a.indexOf('=');
      if (eq >= 0) return a.slice(eq + 1);
      const v = argv[++i];
      if (v === undefined) throw new UsageError(`${a} needs a value`);
      return v;
    };
    if (a === '--json') json = true;
    else if (a === '--only' || a.startsWith('--only=')) {
      const names = value().split(',').filter(Boolean);
      const unknown = names.filter((n) => !(RULES as readonly string[]).includes(n));
      if (unknown.length > 0) throw new UsageError(`unknown rule ${unknown.join(', ')} (rules: ${RULES.join(', ')})`);
      rules = names as Rule[];
    } else if (a === '--root' || a.startsWith('--root=')) root = value();
    else throw new UsageError(`unknown argument ${a}`);
  }
  if (!statSync(root).isDirectory()) throw new UsageError(`--root ${root} is not a directory`);
  return { rules, json, root };
}

/** A bad command line: printed with the usage, exit 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

function main(): number {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`${e.message}\nusage: tsx tools/check-structure.ts [--only ${RULES.join(',')}] [--json] [--root DIR]\n`);
    return 2;
  }
  const violations = checkTree(args.root, args.rules);
  const summary = summarise(violations, args.rules);
  if (args.json) {
    process.stdout.write(`${JSON.stringify({ rules: args.rules, violations, summary }, null, 2)}\n`);
  } else {
    for (const v of violations) process.stdout.write(`${v.file}:${v.line} [${v.rule}] ${v.what}\n`);
    process.stdout.write(`\n${summary.total} violation(s)\n`);
    for (const [rule, n] of Object.entries(summary.byRule)) process.stdout.write(`  ${rule.padEnd(10)} ${n}\n`);
    const files = Object.entries(summary.byFile).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
    if (files.length > 0) process.stdout.write(`by file:\n${files.map(([f, n]) => `  ${String(n).padStart(4)}  ${f}`).join('\n')}\n`);
  }
  return violations.length > 0 ? 1 : 0;
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) process.exitCode = main();
