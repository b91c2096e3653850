/**
 * The in-window part of the network benchmark: ping (and optionally TCP) inside the destination's post-copy window, the gate's hold replayed from the logs, one migration per checkpoint interval.
 */
import path from 'node:path';
import { Cluster } from '../../../lab/cluster.ts';
import { fileSize, waitFor } from '../../../lab/proc.ts';
import { shapeLink, type Link } from '../lib.ts';
import {
  type PingStats,
  type Rec,
  type Sample,
  type TcpResult,
  dist,
  migStatus,
  ping,
  pingStats,
  readText,
  records,
  medianSample,
  sample,
  setCheckpointInterval,
  tcpSamples,
  waitReachable,
} from './measure.ts';
import { log, now, opt, r2 } from './plan.ts';

export interface GatedSample {
  label: string;
  intervalMs: number;
  /** The migration link's shaping during the sample (--gated-links), null: unshaped. */
  link: Link | null;
  /** Replies to requests of the chunks that ended with the window still open: the figure. */
  ping: PingStats;
  /** The first chunk after the wait, not counted: it faults in the reply path's pages. */
  warmup: PingStats | null;
  /** Requests of a chunk that ended after the window had closed: discarded, not counted. */
  discarded: number;
  /** The window stayed open until the last counted chunk ended (else fewer samples than asked). */
  windowOpen: boolean;
  /** Wall-clock span of the counted chunks, ms. */
  sampleMs: number;
  /** TCP transfers right after the ping, in the window too (not in --only rtt). */
  tcp: TcpResult[];
  tcpWindowOpen: boolean | null;
  /** Destination checkpoints taken during the counted chunks (daemon logs). */
  epochs: number;
  /** VM paused for the checkpoint, ms. */
  pauseMs: { p50: number | null; p99: number | null; n: number };
  /** Checkpoint taken → fully sent to the source, after the pause, ms. */
  sendMs: { p50: number | null; p99: number | null; n: number };
  /** Checkpoint sent (D's log) → applied on the source, whose ACK follows at once (S's log), ms. */
  ackMs: { p50: number | null; p99: number | null; n: number };
  /** Time from one checkpoint to the next on the destination (interval + pause + what stretches it), ms. */
  periodMs: { p50: number | null; p99: number | null; n: number };
  /**
   * What the gate alone adds: a request arrives at a uniform point of the epoch period P
   * (the guest runs `interval`, then pauses for the checkpoint; a request arriving in the
   * pause is answered when the guest runs again); the reply leaves at the ACK of the epoch
   * it was produced in. So it waits until the next seal (P/2 on average, P at worst), then
   * the checkpoint pause, the send and the ACK round trip.
   * p50 ≈ P50/2 + pause p50 + send p50 + ACK p50; bound ≈ P99 + pause p99 + send p99 + ACK p99.
   */
  floorMs: { p50: number | null; bound: number | null };
  /** The gate's hold replayed from the logs (gateModel): its share of the RTT. */
  model: ReturnType<typeof gateModel> | null;
  /** model.max + the pass-through p99 before migration: a reply later than this was held by something else. */
  boundMs: number | null;
  /** Replies later than boundMs. */
  aboveBound: { n: number; pct: number | null };
  /** The warm-up before the counted chunks: how long, and the page requests meanwhile. */
  warmupMs: number;
  warmupPostcopyRequests: number | null;
  /** Pages the destination faulted on and asked the source for during the counted chunks (QEMU postcopy-requests). */
  postcopyRequests: number | null;
  /** The same over the whole migration. */
  postcopyRequestsTotal: number | null;
  outcome: string | null;
  /** The migrate CLI's stderr tail when the outcome is not the expected one. */
  migrateError?: string;
  migrateTotalMs: number | null;
  /** Post-copy window: switchover → completion (completing run only), ms. */
  windowMs?: number | null;
}

export interface GateRun {
  bootMs: number;
  before?: Sample;
  gated: GatedSample[];
  /** The same in-window samples with the destination's gate forced open (--control). */
  control: GatedSample[];
  after?: Sample;
  error?: string;
}

/** Wait until the destination has had `epoch` checkpoints acknowledged (so the window has settled). */
export async function waitAcked(c: Cluster, epoch: number, migrating: Promise<unknown>): Promise<void> {
  let ended = false;
  void migrating.finally(() => (ended = true));
  await waitFor(async () => {
    if (ended) throw new Error(`the migration ended before checkpoint ${epoch} was acknowledged: ${JSON.stringify(await migrating)}`);
    return ((await c.status(c.dst)).migration?.ackedEpoch ?? 0) >= epoch;
  }, `checkpoint ${epoch} acknowledged on the destination`);
}

/**
 * Ping in chunks while the post-copy window is open. A chunk counts when the source
 * still reports phase postcopy after its last reply: every reply of it then left the
 * destination through the gated gate (completion switches the gate to pass-through only
 * after the source has recorded it). The chunk during which the window closed is dropped.
 */
export async function windowPing(
  c: Cluster,
  ended: () => boolean,
): Promise<{
  ping: PingStats;
  warmup: PingStats | null;
  warmupFrom: number;
  discarded: number;
  open: boolean;
  from: number | null;
  to: number | null;
}> {
  const rtts: number[] = [];
  const missing: number[] = [];
  let sent = 0;
  const warm: { rtts: number[]; sent: number; missing: number[] } = { rtts: [], sent: 0, missing: [] };
  let warmup: PingStats | null = null;
  let discarded = 0;
  let open = true;
  let from: number | null = null;
  let to: number | null = null;
  const warmupFrom = Date.now();
  while (sent < opt.gatedPingCount) {
    const n = warmup ? Math.min(opt.pingChunk, opt.gatedPingCount - sent) : opt.pingChunk;
    const t0 = Date.now();
    const p = await ping(c, n, opt.pingIntervalMs);
    const t1 = Date.now();
    if (ended() || (await migStatus(c, c.src)).phase !== 'postcopy') {
      discarded += n;
      open = false;
      break;
    }
    if (!warmup) {
      warm.rtts.push(...p.rtts);
      warm.missing.push(...p.missing.map((i) => i + warm.sent));
      warm.sent += n;
      // The warm-up lasts its minimum, then until a chunk is answered in full (the first
      // seconds after the switchover the guest stalls on post-copy faults), at most its maximum.
      const chunks = warm.sent / opt.pingChunk;
      if (chunks >= opt.warmupChunks && (p.received === n || chunks >= opt.warmupMaxChunks))
        warmup = pingStats(warm.sent, warm.rtts, warm.missing);
      continue;
    }
    rtts.push(...p.rtts);
    missing.push(...p.missing.map((i) => i + sent));
    sent += n;
    from ??= t0;
    to = t1;
  }
  return { ping: pingStats(sent, rtts, missing), warmup, warmupFrom, discarded, open, from, to };
}

/** Checkpoint timings of the destination during [from, to] (wall clock), from both daemons' logs. */
export function epochTimings(c: Cluster, dstFrom: number, srcFrom: number, from: number, to: number) {
  const sent = records(c.dst.daemonLog, dstFrom).filter((r) => r.msg === 'checkpoint sent' && typeof r.pauseMs === 'number');
  const applied = new Map(
    records(c.src.daemonLog, srcFrom)
      .filter((r) => r.msg === 'checkpoint applied')
      .map((r) => [Number(r.epoch), Date.parse(String(r.t))]),
  );
  const inSample = sent.filter((r) => {
    const t = Date.parse(String(r.t));
    return t >= from && t <= to;
  });
  const at = inSample.map((r) => Date.parse(String(r.t)));
  const acks = inSample.flatMap((r) => {
    const a = applied.get(Number(r.epoch));
    return a === undefined ? [] : [a - Date.parse(String(r.t))];
  });
  return {
    epochs: inSample.length,
    pauseMs: dist(inSample.map((r) => Number(r.pauseMs))),
    sendMs: dist(inSample.map((r) => Number(r.sendMs ?? 0))),
    ackMs: dist(acks),
    periodMs: dist(at.slice(1).map((t, i) => t - at[i]!)),
  };
}

/**
 * Post-copy page requests between two wall-clock times, from the source's progress
 * records (every 500 ms, `t` in ms since its start). Their clock is placed on the wall
 * clock by the first record, printed right after S logs 'destination ready'.
 */
export function postcopyRequestsBetween(
  c: Cluster,
  srcFrom: number,
  progress: Record<string, any>[],
  from: number,
  to: number,
): number | null {
  const ready = records(c.src.daemonLog, srcFrom).find((r) => r.msg === 'destination ready');
  const first = progress.find((p) => p.destination !== undefined);
  if (!ready || !first) return null;
  const base = Date.parse(String(ready.t)) - Number(first.t);
  const req = progress.filter((p) => typeof p.ram?.postcopyRequests === 'number');
  const at = (wall: number): number | null => {
    const before = req.filter((p) => base + Number(p.t) <= wall).at(-1);
    return before ? Number(before.ram.postcopyRequests) : null;
  };
  const a = at(from);
  const b = at(to);
  return b === null ? null : b - (a ?? 0);
}

/**
 * The gate's own hold, replayed from the logs of the same seconds: a request arriving at
 * time t is answered at once if the guest runs, or when it resumes if it is paused for a
 * checkpoint; the reply belongs to the epoch open at that moment (epoch k: from the seal
 * of k-1 to the seal of k, the VM stopped) and leaves when the gate releases k (its
 * release log; the source's 'checkpoint applied', just before its ACK, when k released
 * nothing). hold(t) = release(k) − t for t every --ping-interval-ms over the sample.
 * This is what a guest answering instantly would see: the gate's share of the RTT.
 */
export function gateModel(
  c: Cluster,
  dstFrom: number,
  srcFrom: number,
  releaseLog: Rec[],
  from: number,
  to: number,
): {
  p50: number | null;
  p99: number | null;
  max: number | null;
  n: number;
  releasesLogged: number;
  /** Per checkpoint of the sample, ms after its start: seal, resume, applied on S, released by the gate. */
  epochs: { k: number; seal: number; cont: number; applied: number | null; released: number | null }[];
} {
  const ckpts = records(c.dst.daemonLog, dstFrom)
    .filter((r) => r.msg === 'checkpoint sent' && typeof r.pauseMs === 'number')
    .map((r) => {
      const cont = Date.parse(String(r.t)) - Number(r.sendMs ?? 0);
      // pauseMs runs from the stop request to the VM running again; the seal comes once it is stopped
      return { k: Number(r.epoch), seal: cont - Number(r.pauseMs) + Number(r.stopMs ?? 0), cont };
    })
    .sort((a, b) => a.k - b.k);
  const applied = new Map(
    records(c.src.daemonLog, srcFrom)
      .filter((r) => r.msg === 'checkpoint applied')
      .map((r) => [Number(r.epoch), Date.parse(String(r.t))]),
  );
  const released = new Map<number, number>();
  for (const r of releaseLog) if (r.t === 'release' && typeof r.at === 'number') released.set(Number(r.epoch), r.at);
  const holds: number[] = [];
  let logged = 0;
  for (let t = from; t <= to; t += opt.pingIntervalMs) {
    const i = ckpts.findIndex((x) => x.cont > t);
    if (i < 0) break;
    const ck = ckpts[i]!;
    const epoch = ck.seal <= t ? ck.k + 1 : ck.k;
    const produced = ck.seal <= t ? ck.cont : t;
    const rel = released.get(epoch) ?? applied.get(epoch);
    if (rel === undefined) continue;
    if (released.has(epoch)) logged++;
    holds.push(Math.max(rel, produced) - t);
  }
  const d = dist(holds);
  const rel = (v: number | undefined): number | null => (v === undefined ? null : r2(v - from));
  return {
    p50: d.p50,
    p99: d.p99,
    max: holds.length ? r2(Math.max(...holds)) : null,
    n: holds.length,
    releasesLogged: logged,
    epochs: ckpts
      .filter((x) => x.cont >= from && x.seal <= to)
      .map((x) => ({
        k: x.k,
        seal: r2(x.seal - from),
        cont: r2(x.cont - from),
        applied: rel(applied.get(x.k)),
        released: rel(released.get(x.k)),
      })),
  };
}

/**
 * One migration with `interval`: wait for D's progress, ping in the window, then abort
 * (unless `last`) and gather what the logs say about the same seconds. `control`: the
 * destination runs with TETHER_FAULTS=gate-open, so the same window without the gate's hold.
 */
export async function windowRun(
  c: Cluster,
  interval: number,
  last: boolean,
  slackMs: number,
  control: boolean,
  link: Link | null,
): Promise<GatedSample> {
  const on = link ? `, link ${link}` : '';
  const label = control ? `gate forced open (control) ${interval} ms${on}` : `gate in window ${interval} ms${on}`;
  setCheckpointInterval(c, c.dst, interval);
  const dstFrom = fileSize(c.dst.daemonLog);
  const srcFrom = fileSize(c.src.daemonLog);
  log(`gate: migrating with interval ${interval} ms${last ? ' (completes)' : ' (aborted after sampling)'}`);
  const t0 = now();
  const startWall = Date.now();
  const migrating = c.migrate();
  let ended = false;
  void migrating.finally(() => (ended = true));
  await waitAcked(c, opt.warmupEpochs, migrating);
  if (opt.holdWindow) {
    // all RAM has arrived (the destination holds its completion request): the window without post-copy faults
    await waitFor(
      () => ended || /holding the completion request/.test(readText(c.dst.daemonLog).slice(dstFrom)),
      'the destination has received all RAM',
      180_000,
    );
  }
  const w = await windowPing(c, () => ended);
  // read now: a rollback removes the destination's VM directory
  const releaseLog = records(path.join(c.dst.stateDir, c.vmName, 'net0.gate.jsonl')).filter((r) => Number(r.at) >= startWall);
  log(
    `${label}: ping p50 ${w.ping.p50} ms p99 ${w.ping.p99} ms (n=${w.ping.received}/${w.ping.sent} in window, ` +
      `${w.discarded} discarded, warm-up p50 ${w.warmup?.p50 ?? '–'} ms)`,
  );
  let tcpRes: TcpResult[] = [];
  let tcpWindowOpen: boolean | null = null;
  if (!opt.rttOnly && opt.gatedSizes.length && w.open) {
    tcpRes = await tcpSamples(c, c.dst, label, opt.gatedSizes, opt.gatedTcpSeconds, c.src);
    tcpWindowOpen = !ended && (await migStatus(c, c.src)).phase === 'postcopy';
  }
  if (!last && !ended) {
    const a = await c.tether(c.src, ['abort', c.vmName]);
    if (a.code !== 0) log(`abort: ${a.stderr}`);
  }
  if (last && opt.holdWindow) c.releaseCompletion();
  const mig = await migrating;
  const g = windowSample(c, {
    label,
    interval,
    link,
    last,
    control,
    slackMs,
    t0,
    w,
    tcpRes,
    tcpWindowOpen,
    dstFrom,
    srcFrom,
    releaseLog,
    mig,
  });
  const { outcome, model, floorMs, boundMs } = g;
  log(
    `${label}: -> ${outcome}; gate hold p50 ${model?.p50} p99 ${model?.p99} max ${model?.max} ms ` +
      `(${model?.releasesLogged}/${model?.n} from the release log; formula p50 ≈ ${floorMs.p50} ms), ${g.aboveBound.pct}% above ${boundMs} ms; ` +
      `warm-up ${g.warmupMs} ms (${g.warmupPostcopyRequests} page requests); ` +
      `${g.epochs} checkpoints (pause p50 ${g.pauseMs.p50}, send p50 ${g.sendMs.p50}, ACK p50 ${g.ackMs.p50} ms), ` +
      `${g.postcopyRequests} post-copy page requests in ${g.sampleMs} ms (${g.postcopyRequestsTotal} in the migration)`,
  );
  if (last) {
    const sw = mig.progress.find((p) => p.phase === 'postcopy');
    g.windowMs = sw && mig.result?.totalMs ? r2(Number(mig.result.totalMs) - Number(sw.t)) : null;
  }
  return g;
}

/** What windowRun collected, and the migration's end. */
interface WindowInputs {
  label: string;
  interval: number;
  link: Link | null;
  last: boolean;
  control: boolean;
  slackMs: number;
  t0: number;
  w: Awaited<ReturnType<typeof windowPing>>;
  tcpRes: TcpResult[];
  tcpWindowOpen: boolean | null;
  dstFrom: number;
  srcFrom: number;
  releaseLog: Rec[];
  mig: Awaited<ReturnType<Cluster['migrate']>>;
}

/** One window's sample: the checkpoint timings and the gate replay of the same seconds, against the pings. */
function windowSample(c: Cluster, x: WindowInputs): GatedSample {
  const { label, interval, link, last, control, slackMs, t0, w, tcpRes, tcpWindowOpen, dstFrom, srcFrom, releaseLog, mig } = x;
  const outcome = (mig.result?.outcome as string | undefined) ?? null;
  const ep = w.from !== null && w.to !== null ? epochTimings(c, dstFrom, srcFrom, w.from, w.to) : null;
  const sum = (...v: (number | null | undefined)[]): number | null =>
    v.some((x) => x === null || x === undefined) ? null : r2(v.reduce<number>((s, x) => s + (x as number), 0));
  const floorMs = {
    p50: sum(ep?.periodMs.p50 == null ? null : ep.periodMs.p50 / 2, ep?.pauseMs.p50, ep?.sendMs.p50, ep?.ackMs.p50),
    bound: sum(ep?.periodMs.p99, ep?.pauseMs.p99, ep?.sendMs.p99, ep?.ackMs.p99),
  };
  // with the gate forced open nothing is held: no replay
  const model = !control && w.from !== null && w.to !== null ? gateModel(c, dstFrom, srcFrom, releaseLog, w.from, w.to) : null;
  // a reply later than the gate's longest hold plus the pass-through p99 was held by something else
  const boundMs = model?.max != null ? r2(model.max + slackMs) : null;
  const above = boundMs === null ? 0 : w.ping.rtts.filter((x) => x > boundMs).length;
  return {
    label,
    intervalMs: interval,
    link,
    ping: w.ping,
    warmup: w.warmup,
    discarded: w.discarded,
    windowOpen: w.open,
    sampleMs: w.from !== null && w.to !== null ? w.to - w.from : 0,
    tcp: tcpRes,
    tcpWindowOpen,
    epochs: ep?.epochs ?? 0,
    pauseMs: ep?.pauseMs ?? dist([]),
    sendMs: ep?.sendMs ?? dist([]),
    ackMs: ep?.ackMs ?? dist([]),
    periodMs: ep?.periodMs ?? dist([]),
    floorMs,
    model,
    boundMs,
    warmupMs: (w.from ?? Date.now()) - w.warmupFrom,
    warmupPostcopyRequests: postcopyRequestsBetween(c, srcFrom, mig.progress, w.warmupFrom, w.from ?? Date.now()),
    aboveBound: { n: above, pct: w.ping.rtts.length ? r2((above / w.ping.rtts.length) * 100) : null },
    postcopyRequests: w.from !== null && w.to !== null ? postcopyRequestsBetween(c, srcFrom, mig.progress, w.from, w.to) : null,
    postcopyRequestsTotal:
      (mig.progress.filter((p) => typeof p.ram?.postcopyRequests === 'number').at(-1)?.ram.postcopyRequests as number | undefined) ?? null,
    outcome,
    ...(outcome === (last ? 'completed' : 'rolled-back') ? {} : { migrateError: mig.stderr.slice(-1500) }),
    migrateTotalMs: (mig.result?.totalMs as number | undefined) ?? r2(now() - t0),
  };
}

export async function gatePhases(c: Cluster, bootMs: number, before?: Sample): Promise<GateRun> {
  const out: GateRun = { bootMs, gated: [], control: [] };
  try {
    out.before = before ?? (await sample(c, c.src, 'gate before migration'));
    const slack = out.before.ping.p99 ?? 0;
    const links: (Link | null)[] = opt.gatedLinks.length ? opt.gatedLinks : [null];
    settings: for (const [j, link] of links.entries()) {
      if (link) {
        shapeLink(c, link);
        log(`gate: migration link shaped to ${link}`);
      }
      if (opt.control) {
        // The same windows with the destination's gate forced open: everything but the gate's hold.
        await c.termDaemon(c.dst);
        await c.restartDaemon(c.dst, { faults: 'gate-open' });
        for (const interval of opt.intervals) {
          const g = await windowRun(c, interval, false, slack, true, link);
          out.control.push(g);
          if (g.outcome !== 'rolled-back') throw new Error(`control: abort did not roll back (${g.outcome})`);
          await waitReachable(c, 'the guest answers on the source after the rollback');
        }
        await c.termDaemon(c.dst);
        await c.restartDaemon(c.dst, { faults: undefined });
      }
      for (const [i, interval] of opt.intervals.entries()) {
        const last = i === opt.intervals.length - 1 && j === links.length - 1;
        const g = await windowRun(c, interval, last, slack, false, link);
        const outcome = g.outcome;
        out.gated.push(g);
        if (last || outcome === 'completed') {
          if (outcome !== 'completed') throw new Error(`the last migration did not complete: ${g.migrateError}`);
          // A window that closed before the abort: the VM is on the destination now, so the
          // remaining intervals cannot be measured in this run (their rows stay empty).
          if (!last) log(`gate: the migration completed before the abort; intervals after ${interval} ms not measured`);
          await waitReachable(c, 'the guest answers on the destination');
          const after: Sample[] = [];
          for (let r = 0; r < opt.steadyRounds; r++) after.push(await sample(c, c.dst, 'gate after completion'));
          out.after = medianSample(after);
          break settings;
        } else {
          if (outcome !== 'rolled-back') throw new Error(`abort did not roll back (${outcome}): ${g.migrateError}`);
          await waitReachable(c, 'the guest answers on the source after the rollback');
        }
      }
    }
  } catch (e) {
    out.error = (e as Error).stack ?? String(e);
    log(`gate failed: ${(e as Error).message}`);
  }
  return out;
}
