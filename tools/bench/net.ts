/**
 * Network benchmark: `npm run bench net [-- options]` (root; network namespaces, real
 * QEMU TCG). Run it under the machine-wide lock:
 *   flock /tmp/tether-qemu.lock npm run bench net [-- --quick]
 *
 * Two clusters of the lab (lab/cluster.ts), booted side by side and
 * both alive for the whole run, so each measurement sees the same background load:
 *   tap:  the guest's NIC is QEMU's own `-netdev tap` on the host bridge (vanilla baseline);
 *         QEMU's default vnet_hdr gives the guest checksum and segmentation offloads;
 *   tap-novnet: the same with vnet_hdr=off: no offloads (a reference: what the offloads are worth);
 *   tap-aa: the plain tap again, in a cluster of its own (opt-in: --only tap,tap-aa,gate): the
 *         steady-state ratio's A/A reference, what two identical guests differ by here;
 *   gate: the guest's NIC is the VM config's `nics`: tether's steady state (QEMU's tap with
 *         vnet_hdr on the sidecar's persistent TAP, nothing through the sidecar) before and
 *         after the migration, and the destination's window (filter-redirectors → relay →
 *         gate → tap) in between (TCP there with --gated-sizes).
 * The guest runs netcheck (tools/guest/netcheck.c) and a slow memcheck; the client
 * namespace pings it (busybox ping: the guest kernel answers ICMP) and moves bulk TCP
 * through netcheck (lab/net/bulk-client.ts: B = guest → client, S = client → guest),
 * transfers of each --sizes one after another for --tcp-seconds.
 *
 * Phases of the gate cluster, all in one run:
 *   before   VM on the source, gate in pass-through (compared with the tap cluster); with
 *            --steady-rounds N the tap clusters' samples and this one alternate N times
 *            and every figure is its median round's (single samples swing with host load);
 *            the after-completion sample is taken N times too
 *   gated    for each --intervals value: migrate with that checkpoint interval (written
 *            into the destination's VM config, which is what the destination runs), wait
 *            until D has had checkpoint --warmup-epochs acknowledged, then ping in chunks
 *            while the post-copy window is open (a slow QEMU max-bandwidth, --bandwidth-mib,
 *            keeps it open ~20 s for a 256 MiB guest): the first --warmup-chunks chunks are
 *            a warm-up (the guest faults its working set in), a chunk counts only if the
 *            source still reports post-copy after it, so every counted reply left through
 *            the gated gate; then `tether abort` (rollback to the source) — except the last
 *            interval, whose migration completes
 *   after    VM on the destination after completion, gate in pass-through
 * Beside each in-window RTT: the gate's expected floor and bound from the checkpoint
 * timings of the same seconds (both daemons' logs), the share of replies later than the
 * bound and the post-copy page requests QEMU counted meanwhile (the faults' share).
 *
 * Prints figures beside targets (PASS/MISS are findings, not test failures) and writes
 * bench-results/net-<time>/ (net.json, summary.md, SVG plots, logs/) and the latest run
 * at bench-results/net.json and net.md.
 *
 * Options (defaults; --quick in brackets, for the CI smoke bench):
 *   --ping-count 400 [25]      pings per sample outside the window, every --ping-interval-ms 20
 *   --gated-ping-count 400 [50]  counted pings per in-window sample, in chunks of
 *                              --ping-chunk 100 [25], after --warmup-chunks 1 and
 *                              --warmup-epochs 5 (D's ackedEpoch)
 *   --tcp-seconds 3 [1]        per direction and size
 *   --gated-sizes (none), --gated-tcp-seconds 2 [1]
 *                              opt-in TCP inside the post-copy window, after the ping, e.g.
 *                              --gated-sizes 65536 (flagged if the window closed meanwhile)
 *   --sizes 65536,4194304 [4194304]   bytes per transfer (64 KiB: request-sized, 4 MiB: bulk)
 *   --intervals 25,50,100 [50] checkpoint intervals of the gated samples
 *   --bandwidth-mib 4 [16]     QEMU max-bandwidth of the migrations (post-copy window length)
 *   --guest-mib 256            guest RAM
 *   --only tap,tap-novnet,gate [tap,gate]   run a subset (tap-aa: add the A/A cluster); `--only rtt`: the gate cluster's
 *                              ping RTT alone (no TCP), each interval first with the
 *                              destination's gate forced open (TETHER_FAULTS=gate-open: the
 *                              window without the gate's hold), then gated; about 3 minutes
 *   --no-control               --only rtt without the forced-open migrations
 *   --control                  also sample each window with the gate forced open (the relay without the hold)
 *   --only stall               the client-visible stall after switchover, tether beside vanilla QEMU post-copy
 *                              (tools/bench/stall.ts): a netclient queries every 20 ms; stall = last answer at or
 *                              before the source's STOP of the switchover → first answer after it; median of
 *                              --stall-repeats 5 migrations of each per --stall-links 200mbit,1gbit (tbf on the
 *                              migration link, QEMU unthrottled); tether's runs are aborted a second after the
 *                              switchover (hold-completion), vanilla's go back and forth; about 2 minutes
 *   --gated-links 1gbit,200mbit   run the in-window samples (control and gated) once per migration link setting
 *                              (tbf on the migration link, both directions, as --stall-links), side by side in one
 *                              run; default: the link unshaped (one setting)
 *   --hold-window              the destination asks to complete only after the last sample (hold-completion):
 *                              with a fast --bandwidth-mib all RAM has moved, so the window is measured
 *                              without post-copy faults (the relay and the gate's hold alone)
 *
 * Modules: net/plan.ts (options, targets, helpers), net/measure.ts (ping, TCP, the clusters),
 * net/window.ts (the in-window samples and the gate replay), net/stall.ts (--only stall),
 * net/report.ts (figures, summary, plots). This file runs them.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { type Sample, TAPS, type TapKind, boot, clusterFor, keepLogs, medianSample, sample } from './net/measure.ts';
import { LOG_DIR, OUT_DIR, RUN_DIR, STARTED, TARGET_GATED_RATIO, TARGET_RATIO, log, now, opt, r2 } from './net/plan.ts';
import { type Results, figures, summaryMarkdown, writePlots } from './net/report.ts';
import { stallBench } from './net/stall.ts';
import { gatePhases } from './net/window.ts';

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('needs root (network namespaces)');
  log(`options ${JSON.stringify({ ...opt, only: [...opt.only] })}`);
  const t0 = now();
  fs.mkdirSync(LOG_DIR, { recursive: true });
  const res: Results = { taps: {} };
  const taps = (Object.keys(TAPS) as TapKind[])
    .filter((k) => opt.only.has(k))
    .map((k) => ({ k, c: clusterFor('qemu-tap', opt.intervals[0]!, TAPS[k].vnetHdr) }));
  const gateC = opt.only.has('gate') ? clusterFor('gate', opt.intervals[0]!) : undefined;
  try {
    // Booted side by side (the boots are not measured); all stay up until the end, so
    // every sample runs beside the same idle guests.
    // The clusters' daemons start one cluster after another: six sidecars starting at once
    // on two cores can miss the cluster's wait for their control sockets.
    for (const c of [...taps.map((x) => x.c), ...(gateC ? [gateC] : [])]) await c.up();
    const boots = await Promise.all([...taps.map(({ k, c }) => boot(c, k)), gateC ? boot(gateC, 'gate') : 0]);
    await sleep(1000); // let the boots' tail (udev, memcheck's first pass) settle
    // --steady-rounds N: every cluster's steady-state sample N times, in turn, medians kept
    const rounds: Sample[][] = taps.map(() => []);
    const gateRounds: Sample[] = [];
    const steadyRounds = gateC ? opt.steadyRounds : 1;
    for (let round = 0; round < steadyRounds; round++) {
      for (const [i, { k, c }] of taps.entries()) {
        const r: { bootMs: number; sample?: Sample; error?: string } = (res.taps[k] ??= { bootMs: boots[i]! });
        if (r.error) continue;
        try {
          rounds[i]!.push(await sample(c, c.src, TAPS[k].label));
          r.sample = medianSample(rounds[i]!);
        } catch (e) {
          r.error = (e as Error).stack ?? String(e);
        }
      }
      if (gateC && steadyRounds > 1) gateRounds.push(await sample(gateC, gateC.src, 'gate before migration'));
    }
    if (gateC) res.gate = await gatePhases(gateC, boots.at(-1)!, gateRounds.length ? medianSample(gateRounds) : undefined);
    if (opt.only.has('stall')) res.stall = await stallBench();
  } finally {
    for (const { k, c } of taps) keepLogs(c, k);
    if (gateC) keepLogs(gateC, 'gate');
    await Promise.all([...taps.map(({ c }) => c.cleanup()), gateC?.cleanup()]);
  }
  const command = `npm run bench net -- ${process.argv.slice(2).join(' ')}`.trim();
  const md = summaryMarkdown(res, command);
  const plots = await writePlots(RUN_DIR, res);
  const json =
    JSON.stringify(
      {
        bench: 'net',
        date: STARTED,
        durationMs: r2(now() - t0),
        host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, kernel: os.release(), node: process.version, loadavg: os.loadavg() },
        options: { ...opt, only: [...opt.only] },
        targetRatio: TARGET_RATIO,
        targetGatedRatio: TARGET_GATED_RATIO,
        figures: figures(res),
        taps: res.taps,
        gate: res.gate ?? null,
        stall: res.stall ?? null,
        plots,
      },
      null,
      2,
    ) + '\n';
  fs.writeFileSync(path.join(RUN_DIR, 'net.json'), json);
  fs.writeFileSync(path.join(RUN_DIR, 'summary.md'), md + plots.map((p) => `\n![${p}](${p})\n`).join(''));
  fs.writeFileSync(path.join(OUT_DIR, 'net.json'), json);
  fs.writeFileSync(path.join(OUT_DIR, 'net.md'), md);
  console.log(
    `\n${md}\n\nwrote ${RUN_DIR}/ (net.json, summary.md, ${plots.length} SVG plots; logs in ${LOG_DIR}) in ${Math.round((now() - t0) / 1000)} s`,
  );
  if (Object.values(res.taps).some((t) => t.error) || res.gate?.error || res.stall?.error) process.exitCode = 1;
}

await main();
