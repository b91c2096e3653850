/**
 * Benchmark entry point: `npm run bench <name> [-- options]`
 *
 *   npm run bench scan    [-- --mib 512 --runs 5]        dirty-page scan (tools/bench/scan.ts)
 *   npm run bench migrate [-- --memcheck-mb 256 ...]     migration benchmark (tools/bench/migrate.ts)
 *   npm run bench gate    [-- --seconds 3]               packet gate and TAP data path (tools/bench/gate.ts)
 *   npm run bench journal [-- --mib 128 --depth 16]      block-write journal vs raw file (tools/bench/journal.ts)
 *   npm run bench disk    [-- --mib 256 --count 20000]   disk through the NBD sidecar vs the file (tools/bench/disk.ts)
 *   npm run bench                                      the suite (tools/bench/suite.ts): strategies side by side
 *   npm run bench -- --quick (or: npm run bench quick) CI smoke of the suite, about 2 minutes
 *   npm run bench suite   [-- --parts grid,ram ...]    the suite with options (see suite.ts)
 *
 * Each benchmark reads its own options from process.argv.
 */
const BENCHES: Record<string, string> = {
  scan: './scan.ts',
  migrate: './migrate.ts',
  gate: './gate.ts',
  journal: './journal.ts',
  disk: './disk.ts',
  suite: './suite.ts',
};

let name = process.argv[2];
// `npm run bench` alone, or with only options (`npm run bench -- --quick`), is the suite.
if (name === undefined || name.startsWith('--')) {
  process.argv.splice(2, 0, 'suite');
  name = 'suite';
}
if (name === 'quick') {
  process.argv.splice(2, 1, 'suite', '--quick');
  name = 'suite';
}
if (name === undefined || !(name in BENCHES)) {
  process.stderr.write(`usage: npm run bench <${Object.keys(BENCHES).join('|')}|quick> [-- options]\n`);
  process.exit(2);
}
// The benchmark sees its own options only.
process.argv.splice(2, 1);
await import(BENCHES[name]!);
