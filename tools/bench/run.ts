/**
 * Benchmark entry point: `npm run bench <name> [-- options]`
 *
 *   npm run bench scan    [-- --mib 512 --runs 5]        dirty-page scan (tools/bench/scan.ts)
 *   npm run bench migrate [-- --memcheck-mb 256 ...]     migration benchmark (tools/bench/migrate.ts)
 *   npm run bench gate    [-- --seconds 3]               packet gate and TAP data path (tools/bench/gate.ts)
 *   npm run bench journal [-- --mib 128 --depth 16]      block-write journal vs raw file (tools/bench/journal.ts)
 *   npm run bench disk    [-- --mib 256 --count 20000]   qemu-img bench: file vs NBD pass-through vs journaled (tools/bench/disk.ts)
 *   npm run bench diskguest [-- --ops 2000]              in-guest 4 KiB O_DIRECT, NBD pass-through and journaled vs file; ckpt bytes/MB (tools/bench/diskguest.ts)
 *   npm run bench lab                                  soft-dirty vs scan pause inside the Debian lab VM (tools/bench/lab.ts, docs/lab.md)
 *   npm run bench net     [-- --quick | --only rtt]      guest network: ping RTT and TCP, gate vs QEMU tap, gated window (tools/bench/net.ts)
 *   npm run bench apps    [-- --quick]                   memcached, PostgreSQL, nginx in the Debian guest across post-copy, tether vs vanilla (tools/bench/apps.ts; not in the quick smoke)
 *   npm run bench                                      the suite (tools/bench/suite.ts): strategies side by side
 *   npm run bench -- --quick (or: npm run bench quick) CI smoke: disk --quick, then the suite's quick run
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
  diskguest: './diskguest.ts',
  net: './net.ts',
  apps: './apps.ts',
  lab: './lab.ts',
  suite: './suite.ts',
};

let name = process.argv[2];
// `npm run bench` alone, or with only options (`npm run bench -- --quick`), is the suite.
if (name === undefined || name.startsWith('--')) {
  process.argv.splice(2, 0, 'suite');
  name = 'suite';
}
if (name === 'quick' || (name === 'suite' && process.argv.includes('--quick'))) {
  // CI smoke: the disk bench's quick variant (seconds), then the suite's quick run.
  process.argv.splice(2, process.argv.length - 2, '--quick');
  await import('./disk.ts');
  process.argv.splice(2, process.argv.length - 2, 'suite', '--quick');
  name = 'suite';
}
if (name === undefined || !(name in BENCHES)) {
  process.stderr.write(`usage: npm run bench <${Object.keys(BENCHES).join('|')}|quick> [-- options]\n`);
  process.exit(2);
}
// The benchmark sees its own options only.
process.argv.splice(2, 1);
await import(BENCHES[name]!);
