/**
 * The network benchmark's report: figures beside their targets, the RTT table, summary.md and the plots.
 */
import os from 'node:os';
import { barsSpec, markdownTable, plotDir, type Figure } from '../report.ts';
import { type PingStats, type Sample, type TapKind, type TcpResult } from './measure.ts';
import { MiB, STARTED, TARGET_GATED_RATIO, TARGET_RATIO, log, opt, r2 } from './plan.ts';
import { STALL_QUERY_MS, type StallResult, stallFigures } from './stall.ts';
import { type GateRun, type GatedSample } from './window.ts';

export interface Results {
  taps: Partial<Record<TapKind, { bootMs: number; sample?: Sample; error?: string }>>;
  gate?: GateRun;
  stall?: StallResult;
}

export const dirName = (d: string): string => (d === 'g2c' ? 'guest → client' : 'client → guest');
export const sizeName = (s: number): string => (s >= MiB ? `${s / MiB} MiB` : `${s / 1024} KiB`);
export const mbit = (s: Sample | undefined, dir: string, size: number): number | null =>
  s?.tcp.find((t) => t.dir === dir && t.size === size)?.mbitPerS ?? null;

export function cpuNote(s: { tcp: TcpResult[] } | undefined, dir: string, size: number): string {
  const c = s?.tcp.find((t) => t.dir === dir && t.size === size)?.cpu;
  if (!c) return '';
  const peer = c.peerPct !== undefined ? `, source's sidecar ${c.peerPct ?? '–'}%` : '';
  const r = s?.tcp.find((t) => t.dir === dir && t.size === size)?.mbitPerS;
  // the guest's throughput per core of its QEMU: what the path costs apart from CPU starvation
  const perCore = r && c.qemuPct ? `; ${Math.round((r * 100) / c.qemuPct)} Mbit/s per core of QEMU` : '';
  return `CPU: QEMU ${c.qemuPct ?? '–'}%, sidecar ${c.sidecarPct ?? '–'}%${peer}${perCore}`;
}

/** ", migration link 200mbit" for a sample taken with --gated-links, "" unshaped. */
export const linkName = (s: GatedSample): string => (s.link ? `, migration link ${s.link}` : '');
/** The forced-open sample of the same interval and link setting as `s`. */
export const controlOf = (g: GateRun | undefined, s: GatedSample): GatedSample | undefined =>
  g?.control.find((x) => x.intervalMs === s.intervalMs && x.link === s.link);

export function figures(res: Results): Figure[] {
  const F: Figure[] = stallFigures(res.stall);
  if (!['tap', 'tap-novnet', 'tap-aa', 'gate'].some((k) => opt.only.has(k))) return F;
  F.push(...pingFigures(res));
  if (opt.rttOnly) return F;
  for (const dir of ['g2c', 'c2g'] as const) for (const size of opt.sizes) F.push(...tcpFigures(res, dir, size));
  return F;
}

/** Ping RTT of every phase, and what the gate's hold explains of it in the window. */
function pingFigures(res: Results): Figure[] {
  const F: Figure[] = [];
  const tap = res.taps.tap?.sample;
  const novnet = res.taps['tap-novnet']?.sample;
  const g = res.gate;
  const pingFig = (name: string, s: { ping: PingStats } | undefined, note = ''): void => {
    const loss = s ? `${s.ping.received}/${s.ping.sent} replies` : '';
    F.push({ name: `${name}: ping RTT p50`, value: s?.ping.p50 ?? null, unit: 'ms', note: [loss, note].filter(Boolean).join('; ') });
    F.push({ name: `${name}: ping RTT p99`, value: s?.ping.p99 ?? null, unit: 'ms' });
  };
  if (opt.only.has('tap')) pingFig('QEMU tap (vanilla)', tap);
  if (novnet) pingFig('QEMU tap, vnet_hdr=off', novnet);
  pingFig('gate, before migration (pass-through)', g?.before);
  for (const s of g?.gated ?? []) {
    const name = `gate, post-copy window, interval ${s.intervalMs} ms${linkName(s)} (gated)`;
    pingFig(
      name,
      s,
      `n=${s.ping.received} in window over ${(s.sampleMs / 1000).toFixed(1)} s` +
        `${s.discarded ? `, ${s.discarded} discarded (window closed)` : ''}; warm-up (not counted) p50 ${s.warmup?.p50 ?? '–'} ms, ${s.warmup?.received ?? 0}/${s.warmup?.sent ?? 0} replies` +
        `${s.windowOpen ? '' : `; WINDOW CLOSED: fewer than ${opt.gatedPingCount} samples`}`,
    );
    F.push({
      name: `${name}: gate hold p50 (replayed from the logs)`,
      value: s.model?.p50 ?? null,
      unit: 'ms',
      note:
        `p99 ${s.model?.p99 ?? '–'}, max ${s.model?.max ?? '–'} ms; ${s.epochs} checkpoints in the sample: epoch period p50 ${s.periodMs.p50 ?? '–'}, ` +
        `pause p50 ${s.pauseMs.p50 ?? '–'}, send p50 ${s.sendMs.p50 ?? '–'}, ACK p50 ${s.ackMs.p50 ?? '–'} ms ` +
        `(period/2 + pause + send + ACK ≈ ${s.floorMs.p50 ?? '–'} ms)`,
    });
    F.push({
      name: `${name}: replies later than the gate explains`,
      value: s.aboveBound.pct,
      unit: '%',
      note:
        `${s.aboveBound.n} of ${s.ping.received} above ${s.boundMs ?? '–'} ms (longest gate hold + pass-through p99); ` +
        `post-copy page requests: ${s.postcopyRequests ?? '–'} in the sample, ${s.warmupPostcopyRequests ?? '–'} in the ${(s.warmupMs / 1000).toFixed(1)} s warm-up`,
    });
  }
  pingFig('gate, after completion (pass-through)', g?.after);
  return F;
}

/** TCP throughput of one direction and transfer size: tap, steady state, after completion, in the window. */
function tcpFigures(res: Results, dir: 'g2c' | 'c2g', size: number): Figure[] {
  const F: Figure[] = [];
  const tap = res.taps.tap?.sample;
  const novnet = res.taps['tap-novnet']?.sample;
  const g = res.gate;
  const what = `TCP ${dirName(dir)}, ${sizeName(size)} transfers`;
  const t = mbit(tap, dir, size);
  const b = mbit(g?.before, dir, size);
  F.push({ name: `${what}: QEMU tap`, value: t, unit: 'Mbit/s', note: cpuNote(tap, dir, size) });
  F.push({ name: `${what}: tether steady state (before migration)`, value: b, unit: 'Mbit/s', note: cpuNote(g?.before, dir, size) });
  F.push({
    name: `${what}: steady state / tap`,
    value: t && b ? r2(b / t) : null,
    unit: '×',
    target: { op: '>=', value: TARGET_RATIO },
  });
  const aa = res.taps['tap-aa']?.sample;
  if (aa) {
    const n = mbit(aa, dir, size);
    F.push({ name: `${what}: QEMU tap, second cluster (A/A)`, value: n, unit: 'Mbit/s', note: cpuNote(aa, dir, size) });
    F.push({
      name: `${what}: second tap cluster / tap (A/A: the identical path twice)`,
      value: t && n ? r2(n / t) : null,
      unit: '×',
      target: { op: '>=', value: TARGET_RATIO },
      note: "what this machine's noise does to the steady-state ratio",
    });
  }
  if (novnet) {
    const n = mbit(novnet, dir, size);
    F.push({
      name: `${what}: QEMU tap, vnet_hdr=off`,
      value: n,
      unit: 'Mbit/s',
      note: `no offloads, like the gate; ${cpuNote(novnet, dir, size)}`,
    });
    F.push({
      name: `${what}: steady state / tap vnet_hdr=off`,
      value: n && b ? r2(b / n) : null,
      unit: '×',
      note: 'what the offloads are worth',
    });
  }
  const a = mbit(g?.after, dir, size);
  F.push({ name: `${what}: tether after completion (relay detached)`, value: a, unit: 'Mbit/s' });
  F.push({
    name: `${what}: after completion / tap`,
    value: t && a ? r2(a / t) : null,
    unit: '×',
    target: { op: '>=', value: TARGET_RATIO },
  });
  for (const s of g?.gated ?? []) {
    const tr = s.tcp.find((x) => x.dir === dir && x.size === size);
    if (!tr) continue; // not measured at this size in the window
    F.push({
      name: `${what}: gated, interval ${s.intervalMs} ms${linkName(s)}`,
      value: tr?.mbitPerS ?? null,
      unit: 'Mbit/s',
      note: [
        tr?.transferMs ? `transfer p50 ${tr.transferMs.p50} ms` : tr?.error,
        s.tcpWindowOpen ? '' : 'WINDOW CLOSED during the sample',
        cpuNote(s, dir, size),
      ]
        .filter(Boolean)
        .join('; '),
    });
    const ctl = controlOf(g, s)?.tcp.find((x) => x.dir === dir && x.size === size);
    if (ctl) {
      F.push({
        name: `${what}: in window, gate forced open (relay only), interval ${s.intervalMs} ms${linkName(s)}`,
        value: ctl.mbitPerS ?? null,
        unit: 'Mbit/s',
        note: cpuNote(controlOf(g, s), dir, size),
      });
      F.push({
        name: `${what}: relay only / tap${linkName(s)}`,
        value: t && ctl.mbitPerS ? r2(ctl.mbitPerS / t) : null,
        unit: '×',
      });
    }
    F.push({
      name: `${what}: gated, interval ${s.intervalMs} ms${linkName(s)} / tap`,
      value: t && tr?.mbitPerS ? r2(tr.mbitPerS / t) : null,
      unit: '×',
      target: { op: '>=', value: TARGET_GATED_RATIO },
    });
  }
  return F;
}

/**
 * The closing note's RTT table: each phase's ping RTT beside what the gate alone explains
 * (its floor and bound, from the checkpoint timings of the same seconds).
 */
export function rttTable(res: Results): string[] {
  const g = res.gate;
  if (!g) return [];
  const ms = (v: number | null | undefined): string => (v === null || v === undefined ? '–' : `${v}`);
  const rows = [
    '| ping RTT client → guest | replies / requests | p50 ms | p99 ms | same window, gate forced open: p50 / p99 ms | gate hold replayed: p50 / p99 ms | later than the gate explains | warm-up (not counted) | post-copy page requests: warm-up / sample |',
    '|---|---:|---:|---:|---:|---:|---:|---|---:|',
  ];
  const plain = (name: string, s: Sample | undefined): void => {
    if (s) rows.push(`| ${name} | ${s.ping.received} / ${s.ping.sent} | ${ms(s.ping.p50)} | ${ms(s.ping.p99)} | | | | | |`);
  };
  const ctl = (s: GatedSample): string => {
    const k = controlOf(g, s);
    if (!k) return '–';
    const n = `${k.ping.received} / ${k.ping.sent}${k.windowOpen ? '' : ' WINDOW CLOSED'}`;
    return `${ms(k.ping.p50)} / ${ms(k.ping.p99)} (n ${n})`;
  };
  plain('before migration (pass-through)', g.before);
  for (const s of g.gated) {
    const wu = s.warmup;
    rows.push(
      `| post-copy window, interval ${s.intervalMs} ms${linkName(s)} | ${s.ping.received} / ${s.ping.sent} in window` +
        `${s.discarded ? ` (${s.discarded} discarded)` : ''}${s.windowOpen ? '' : ' WINDOW CLOSED'} | ` +
        `${ms(s.ping.p50)} | ${ms(s.ping.p99)} | ${ctl(s)} | ${ms(s.model?.p50)} / ${ms(s.model?.p99)} | ` +
        `${s.aboveBound.pct === null ? '–' : `${s.aboveBound.pct} % (> ${s.boundMs} ms)`} | ` +
        `${(s.warmupMs / 1000).toFixed(1)} s, ${wu?.received ?? 0} / ${wu?.sent ?? 0} replies, max ${ms(wu?.max)} ms | ` +
        `${s.warmupPostcopyRequests ?? '–'} / ${s.postcopyRequests ?? '–'} in ${(s.sampleMs / 1000).toFixed(1)} s |`,
    );
  }
  plain('after completion (pass-through)', g.after);
  return [
    ...rows,
    '',
    `In-window samples: chunks of ${opt.pingChunk} pings every ${opt.pingIntervalMs} ms, from checkpoint ${opt.warmupEpochs} ` +
      `acknowledged on. Warm-up (not counted): at least ${opt.warmupChunks} chunk(s), then until a chunk is answered in full ` +
      `(at most ${opt.warmupMaxChunks}): in the first seconds after the switchover the guest stalls while it faults its working set in. ` +
      'A chunk counts only if the source still reports post-copy after its last reply (so every counted reply left through ' +
      'the gated gate); a chunk during which the window closed is discarded. Requests − replies: replies not back when ' +
      'busybox ping stopped waiting (twice the slowest RTT it had seen, after the last request of a chunk), i.e. a stall; ' +
      "the gate drops nothing; p99 leaves them out. Gate hold: the gate's share, replayed from the logs of the same seconds " +
      '(a request every ping interval, answered at once or when the guest resumes from its checkpoint pause, released with ' +
      "its epoch per the gate's release log). Gate forced open: the same migration and window with the destination's " +
      'gate in pass-through (TETHER_FAULTS=gate-open), measured first: checkpoint pauses, post-copy faults and the guest ' +
      "without the gate's hold. Later than the gate explains: RTT above the longest replayed hold plus the " +
      "pass-through p99: held by something else, mostly post-copy faults blocking the guest's QEMU (page requests QEMU " +
      'counted in the same seconds in the last column).',
    '',
  ];
}

export function summaryMarkdown(res: Results, command: string): string {
  const load = os
    .loadavg()
    .map((l) => l.toFixed(2))
    .join(' ');
  const last = res.gate?.gated.at(-1);
  return [
    `# net benchmark, ${STARTED}`,
    '',
    ...(opt.only.size === 1 && res.stall
      ? [
          `\`${command}\` — QEMU TCG, netcheck + memcheck 4 MiB at 1 MB/s; ${os.cpus().length} CPUs, load average ${load} at the end ` +
            '(other work may share this machine: figures are indicative).',
          '',
        ]
      : [
          `\`${command}\` — guest ${opt.guestMiB} MiB, QEMU TCG, netcheck + memcheck 4 MiB at 1 MB/s; ping ×${opt.pingCount} every ` +
            `${opt.pingIntervalMs} ms; TCP ${opt.tcpSeconds} s per direction and transfer size; migration link ${opt.bandwidthMiB} MiB/s` +
            `${last?.windowMs ? ` (post-copy window of the completing run ${(last.windowMs / 1000).toFixed(1)} s)` : ''}; ` +
            `${os.cpus().length} CPUs, load average ${load} at the end (other work may share this machine: figures are indicative).`,
          '',
        ]),
    ...rttTable(res),
    ...(res.stall
      ? [
          `Stall after switchover: a netclient queries the guest's netcheck every ${STALL_QUERY_MS} ms over one TCP connection; ` +
            "the stall is the longest silence between answers from the last answer at or before the source QEMU's STOP of the " +
            "switchover (tether: from the source's log; vanilla: its QMP event) over the next 50 answers (last answer before → " +
            'first answer after, unless a reply already in flight at the STOP arrives first); median of ' +
            `${opt.stallRepeats} migrations per side and link (tbf on the migration link, QEMU unthrottled, guest ${opt.guestMiB} MiB). ` +
            'tether runs with hold-completion and is aborted once the client has had a second of answers from the destination; ' +
            'vanilla post-copy (migrate, then migrate-start-postcopy at once) moves the VM back and forth between the hosts.',
          '',
        ]
      : []),
    markdownTable(figures(res)),
    '',
    'PASS/MISS compare this run with the targets of issue 16 (steady state ≥ 0.95× and gated ≥ 0.8× QEMU tap; stall after ' +
      "switchover ≤ 2× vanilla post-copy's); findings, not test failures.",
  ].join('\n');
}

export async function writePlots(dir: string, res: Results): Promise<string[]> {
  const { files, put } = plotDir(dir, log);
  const g = res.gate;
  type Sampled = { ping: PingStats; tcp: TcpResult[] };
  const samples: [string, Sampled | undefined][] = [
    ['QEMU tap', res.taps.tap?.sample],
    ['tap vnet_hdr=off', res.taps['tap-novnet']?.sample],
    ['QEMU tap (A/A)', res.taps['tap-aa']?.sample],
    ['gate before', g?.before],
    ...(g?.gated ?? []).map((s): [string, Sampled] => [`gated ${s.intervalMs} ms`, s]),
    ['gate after', g?.after],
  ];
  const rtt = samples.flatMap(([series, s]) =>
    s && s.ping.p50 !== null
      ? [
          { group: 'p50', series, value: s.ping.p50 },
          { group: 'p99', series, value: s.ping.p99 ?? 0 },
        ]
      : [],
  );
  if (rtt.length) await put('rtt.svg', barsSpec({ title: 'Ping RTT client → guest', yTitle: 'ms', rows: rtt }));
  const thr = samples.flatMap(([series, s]) =>
    (s?.tcp ?? []).flatMap((t) =>
      t.mbitPerS !== null
        ? [{ group: `${t.dir === 'g2c' ? 'guest→client' : 'client→guest'} ${sizeName(t.size)}`, series, value: t.mbitPerS }]
        : [],
    ),
  );
  if (thr.length) await put('tcp.svg', barsSpec({ title: 'TCP throughput through the NIC', yTitle: 'Mbit/s', rows: thr }));
  return files;
}
