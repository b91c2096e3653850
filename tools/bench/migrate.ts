/**
 * Migration benchmark: `npm run bench migrate [-- options]`
 *
 * One run, three parts, each in its own two-namespace Cluster (lab/cluster.ts:
 * real QEMU TCG, memcheck guest, a tether daemon per namespace):
 *
 *  1. tether migration that completes: per-checkpoint VM pause p50/p99, bytes per
 *     checkpoint, number of checkpoints, total and switchover time (from
 *     `tether migrate --json`), plus the destination's per-checkpoint log records.
 *  2. vanilla QEMU post-copy of the same VM config, QEMU started directly (no tether) in
 *     the two namespaces: caps postcopy-ram, migrate-incoming, migrate,
 *     migrate-start-postcopy at once; timed from `migrate` to the source's query-migrate
 *     status `completed`.
 *  3. rollback: repeated tether migrations of one VM interrupted mid post-copy (once >= N
 *     checkpoints are applied), by `tether abort` and kill -9 of the destination QEMU in
 *     turn (link-down on request), once with the hot standby and once without (a fresh
 *     QEMU per restore), side by side: restore p50/p99 per mode.
 *
 * Every serial log is checked for memcheck CORRUPT lines. Prints a table and writes, per
 * run, bench-results/migrate-<time>/: migrate.json, summary.md (figures beside targets,
 * PASS/MISS), timeline-*.svg (one per migration) and compare-*.svg (Vega-Lite, headless);
 * bench-results/migrate.json and migrate.md are the latest run. Logs under
 * bench-results/migrate-<time>/logs/.
 *
 * Options (defaults):
 *   --memcheck-mb 256        memcheck buffer in the 512 MiB guest
 *   --memcheck-rate 0        memcheck MB/s (0 = unthrottled: the whole buffer every pass)
 *   --interval-ms 50         checkpoint interval
 *   --bandwidth-mib 16       QEMU max-bandwidth (pre- and post-copy), MiB/s, for the
 *                            completing runs, the same for tether and vanilla (0 = QEMU default)
 *   --rollback-bandwidth-mib 16   the same for the interrupted runs
 *   --interrupt-epoch 3      interrupt once this checkpoint is applied on the source
 *   --passes 2               memcheck passes to wait for before each migration / after it
 *   --only tether,vanilla,rollback   run a subset
 *   --standby both           rollback runs with the hot standby: on, off or both (side by side)
 *   --rollback-repeats 4     interrupted migrations per standby mode (one VM, one after another)
 *   --rollback-kinds abort,kill-destination-qemu   interrupts, used in turn (also: link-down)
 *   --rollback-vm plain      the interrupted VM: plain (memcheck only) or io (also a NIC through
 *                            the packet gate and a diskcheck disk through the journal, as the
 *                            demo's: its restore reconnects the NIC before the guest runs)
 *   --guest-mib 512          guest RAM (the checkpoint scan is compared with the hashing floor of
 *                            the same bytes: native hashFile over a file that size, all cores)
 *   --quick                  CI smoke (a few minutes): memcheck 64 MB, unthrottled completing
 *                            runs, one pass, 1 interrupt per standby mode
 *   --only tls               instead: the migration stream with TLS vs plain, side by side at two link
 *                            speeds (tools/bench/tls.ts; --tls-links 1gbit,200mbit --tls-repeats 4,
 *                            --memcheck-mb 64 --memcheck-rate 8 unless given); writes bench-results/migrate-tls.json
 *
 * Modules: migrate/plan.ts (options, shared steps), migrate/complete.ts (parts 1 and 2),
 * migrate/rollback.ts (part 3), migrate/report.ts (table, figures, plots). This file runs them.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { num, str } from './args.ts';
import { hashFloor, log, now, r2, type Link } from './lib.ts';
import { benchStreamTls } from './tls.ts';
import { benchTetherComplete, benchVanilla } from './migrate/complete.ts';
import { LOG_DIR, opt, OUT_DIR, RUN_DIR, STARTED } from './migrate/plan.ts';
import { report, summaryMarkdown, writePlots, type Results } from './migrate/report.ts';
import { benchRollback } from './migrate/rollback.ts';

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('needs root (network namespaces)');
  const t0 = now();
  log(`options ${JSON.stringify({ ...opt, only: [...opt.only] })}`);
  fs.mkdirSync(OUT_DIR, { recursive: true });
  if (opt.only.size === 1 && opt.only.has('tls')) {
    await benchStreamTls({
      links: str('tls-links', '1gbit,200mbit').split(',') as Link[],
      repeats: num('tls-repeats', 4),
      memcheckMB: num('memcheck-mb', 64),
      memcheckRate: num('memcheck-rate', 8),
      guestMiB: opt.guestMiB,
      outDir: OUT_DIR,
      runDir: RUN_DIR,
    });
    return;
  }
  fs.mkdirSync(LOG_DIR, { recursive: true });
  const res: Results = { memcheck: [] };
  if (opt.only.has('tether')) res.tether = await benchTetherComplete();
  if (opt.only.has('vanilla')) res.vanilla = await benchVanilla();
  if (opt.only.has('rollback')) res.rollback = await benchRollback();
  if (res.tether) res.hashFloor = await hashFloor(opt.guestMiB);
  res.memcheck = [...(res.tether?.memcheck ?? []), ...(res.vanilla?.memcheck ?? []), ...(res.rollback?.memcheck ?? [])];

  const text = report(res);
  console.log(text);
  await writeResults(res, text, t0);
}

/** migrate.json, summary.md and the plots into the run's folder, the latest at fixed names under bench-results/. */
async function writeResults(res: Results, text: string, t0: number): Promise<void> {
  const started = STARTED;
  let qemuVersion = '';
  try {
    qemuVersion = execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0] ?? '';
  } catch {
    /* reported empty */
  }
  const runDir = RUN_DIR;
  fs.mkdirSync(runDir, { recursive: true });
  const command = `npm run bench migrate -- ${process.argv.slice(2).join(' ')}`.trim();
  const md = summaryMarkdown(res, command, started);
  const plots = await writePlots(runDir, res);
  const json =
    JSON.stringify(
      {
        bench: 'migrate',
        date: started,
        durationMs: r2(now() - t0),
        host: {
          cpus: os.cpus().length,
          cpuModel: os.cpus()[0]?.model,
          kernel: os.release(),
          node: process.version,
          qemu: qemuVersion,
          loadavg: os.loadavg(),
        },
        options: { ...opt, only: [...opt.only], accel: 'tcg' },
        hashFloor: res.hashFloor ?? null,
        notes: [
          'tether totalMs runs from the migrate request in the source daemon: peer connect, destination QEMU start, caps, QEMU migrate, ' +
            'pause-before-switchover + checkpoint-0 device save, post-copy with checkpoints, final checkpoint + ack, stop of the source QEMU.',
          'vanilla totalMs runs from QMP migrate to the source query-migrate status completed (10 ms polling); the destination QEMU was ' +
            'started and listening beforehand (destinationSetupMs, also reported summed).',
          'the same QEMU max-bandwidth/max-postcopy-bandwidth is set for tether and vanilla in the completing runs.',
          'the machine has 2 cores and may run other work at the same time: timings are indicative.',
        ],
        summary: text.split('\n'),
        memcheck: { corruptTotal: res.memcheck.reduce((s, m) => s + m.corrupt, 0), logs: res.memcheck },
        tether: res.tether ?? null,
        vanilla: res.vanilla ?? null,
        rollback: res.rollback ?? null,
        plots,
      },
      null,
      2,
    ) + '\n';
  fs.writeFileSync(path.join(runDir, 'migrate.json'), json);
  fs.writeFileSync(path.join(runDir, 'summary.md'), md + plots.map((p) => `\n![${p}](${p})\n`).join(''));
  // The latest run, at fixed names.
  fs.writeFileSync(path.join(OUT_DIR, 'migrate.json'), json);
  fs.writeFileSync(path.join(OUT_DIR, 'migrate.md'), md);
  console.log(`\n${md}\n\nwrote ${runDir}/ (migrate.json, summary.md, ${plots.length} SVG plots; logs in ${LOG_DIR})`);
}

await main();
