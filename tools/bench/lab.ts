/**
 * The lab sweep (docs/lab.md): `npm run bench lab`. Boots the Debian lab guest (Debian's
 * 6.1 cloud kernel, CONFIG_MEM_SOFT_DIRTY=y; Debian's nodejs) with `tether.lab=sweep`: inside
 * it the production SoftDirtyTracker and ScanTracker each collect (collectPages, what a
 * checkpoint calls while the VM is paused) after a writer dirtied N random pages of a RAM file
 * of M MiB on tmpfs; median of 5 per point. Prints the table and writes
 * bench-results/lab.json. Figures are from inside a VM (TCG without usable KVM): compare the
 * two trackers with each other, not with host figures.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, runLab } from '../lab/vm.ts';

const run = await runLab('sweep', { memoryMiB: 1536, timeoutMs: 900_000 });
const rows = run.results.filter((r) => r['case'] === 'sweep');
const err = run.results.find((r) => r['case'] === 'error');
if (run.exit !== 0 || err || rows.length === 0) {
  process.stderr.write(run.console);
  throw new Error(`lab sweep failed (exit ${run.exit}): ${String(err?.['error'] ?? 'no rows')}`);
}
const pad = (v: unknown, n: number) => String(v).padStart(n);
process.stdout.write(`lab sweep: accel ${run.accel}, VM ran ${run.seconds.toFixed(0)} s\n`);
process.stdout.write(
  `${pad('RAM MiB', 8)} ${pad('dirty', 7)} ${pad('sd cand', 8)} ${pad('soft-dirty ms', 14)} ${pad('scan ms', 9)} ${pad('scan/sd', 8)}\n`,
);
for (const r of rows) {
  const sd = Number(r['softDirtyMs']);
  const sc = Number(r['scanMs']);
  process.stdout.write(
    `${pad(r['ramMiB'], 8)} ${pad(r['dirtyPages'], 7)} ${pad(r['softDirtyCandidates'], 8)} ${pad(sd.toFixed(1), 14)} ${pad(sc.toFixed(1), 9)} ${pad((sc / sd).toFixed(1), 8)}\n`,
  );
}
process.stdout.write(
  'target: soft-dirty pause grows with dirty pages, not RAM size (same dirty count, larger RAM: about the same ms); scan grows with RAM\n',
);
const out = join(ROOT, 'bench-results');
mkdirSync(out, { recursive: true });
writeFileSync(join(out, 'lab.json'), JSON.stringify({ accel: run.accel, vmSeconds: run.seconds, rows }, null, 2) + '\n');
process.stdout.write(`wrote ${join(out, 'lab.json')}\n`);
