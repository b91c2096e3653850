/**
 * What the suite watches during one migration: the workload's readiness and progress (memcheck,
 * diskcheck, netcheck), the destination gate's held frames, the link's byte counters; and
 * the Cluster options and kept logs of a cell.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Cluster } from '../../../lab/cluster.ts';
import { type NetClient } from '../../../lab/net/driver.ts';
import { sh, waitFor } from '../../../lab/proc.ts';
import { waitDiskPasses, waitPasses } from '../../../lab/serial.ts';
import { type ClusterOptions, type Host } from '../../../lab/topology.ts';
import { copyClusterLogs, type Rec } from '../lib.ts';
import { LOG_DIR, opt, UNLIMITED_BW, type Cell, type Workload } from './plan.ts';

/** Scrapes the destination's gate gauges every 100 ms from inside its namespace. */
export class HeldScraper {
  readonly samples: { t: number; held: number; released: number }[] = [];
  #proc;
  constructor(h: Host) {
    const js = `setInterval(() => fetch('http://${h.addr}:9700/metrics').then((r) => r.text()).then((x) => {
      let held = 0, released = 0;
      for (const l of x.split('\\n')) {
        if (l.startsWith('tether_gate_held_frames{')) held += Number(l.split(' ').pop());
        if (l.startsWith('tether_gate_frames_total{') && l.includes('action="released"')) released += Number(l.split(' ').pop());
      }
      process.stdout.write(JSON.stringify({ t: Date.now(), held, released }) + '\\n');
    }).catch(() => { /* the sidecar restarting: no sample this tick */ }), 100);`;
    this.#proc = spawn('ip', ['netns', 'exec', h.ns, process.execPath, '-e', js], { stdio: ['ignore', 'pipe', 'ignore'] });
    let buf = '';
    this.#proc.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        try {
          this.samples.push(JSON.parse(buf.slice(0, nl)));
        } catch {
          /* partial */
        }
        buf = buf.slice(nl + 1);
      }
    });
  }
  stop(): void {
    this.#proc.kill('SIGKILL');
  }
}

/** Bytes the source's end of the migration link sent (forward) and received (back). */
export function linkBytes(c: Cluster): { fwd: number; back: number } {
  const j = JSON.parse(sh('ip', ['-n', c.src.ns, '-j', '-s', 'link', 'show', 'dev', `${c.id}a`])) as Rec[];
  const st = j[0]?.stats64 ?? {};
  return { fwd: Number(st.tx?.bytes ?? 0), back: Number(st.rx?.bytes ?? 0) };
}

export function clusterOpts(cell: Cell, vanilla: boolean): ClusterOptions {
  const memcheckMiB = cell.workload === 'mc25' ? cell.ramMiB / 4 : cell.workload === 'mc75' ? (cell.ramMiB * 3) / 4 : 16;
  const interval = cell.strategy.startsWith('tether-') ? Number(cell.strategy.slice(7)) : 50;
  const o: ClusterOptions = {
    vm: {
      memcheckMiB,
      memcheckMBps: opt.memcheckRate,
      intervalMs: interval,
      maxBandwidth: UNLIMITED_BW,
      memoryMiB: cell.ramMiB,
      hotStandby: true,
      // idle and net: the guest only sleeps (net: beside netcheck); the last tether.run wins
      ...(cell.workload === 'idle' || cell.workload === 'net' ? { appendExtra: 'tether.run=sleep:1000000' } : {}),
    },
  };
  if (cell.workload === 'net') o.guestNet = vanilla ? 'qemu-tap' : 'gate';
  if (cell.workload === 'disk') o.disk = { guest: 'diskcheck', mib: 64, blocks: 4096, writesPerPass: 256, delayMs: 1 };
  return o;
}

export function isMemcheck(w: Workload): boolean {
  return w === 'mc25' || w === 'mc75';
}

/** The workload is up and past its first round (memcheck: one full pass over its buffer). */
export async function workloadReady(c: Cluster, cell: Cell, serial: string): Promise<NetClient | undefined> {
  if (isMemcheck(cell.workload)) {
    // fail fast if the guest's program died (e.g. its buffer does not fit the guest)
    await waitFor(() => {
      const text = readText(serial);
      const dead = /(memcheck: .*|command exited rc=\d+|Out of memory.*)/.exec(text);
      if (dead) throw new Error(`memcheck did not run: ${dead[1]}`);
      return /memcheck pass 1 /.test(text);
    }, `memcheck's first pass (${serial})`);
    const r = await waitPasses(serial, 0, 1, 'before migrating');
    if (r.corrupt.length) throw new Error(`memcheck CORRUPT before migrating: ${r.corrupt[0]}`);
  } else if (cell.workload === 'disk') {
    const r = await waitDiskPasses(serial, 0, 1, 'before migrating');
    if (r.mismatch.length) throw new Error(`diskcheck before migrating: ${r.mismatch[0]}`);
  } else {
    await waitFor(() => /tether-init: run: sleep/.test(readText(serial)), 'the guest up', 120_000);
  }
  if (cell.workload === 'net') {
    const cl = c.netclient({ intervalMs: 20 });
    await cl.waitAnswers(5, 'before migrating', 0, 120_000);
    return cl;
  }
  return undefined;
}

/** The workload made progress on the destination after the migration. */
export async function workloadAfter(cell: Cell, serial: string, from: number, client?: NetClient): Promise<void> {
  // A guest that died on the destination makes no progress: say so at once instead of timing out.
  const watch = setInterval(() => {
    const panic = /Kernel panic[^\n]*/.exec(readText(serial));
    if (panic) died = panic[0];
  }, 500);
  let died: string | null = null;
  try {
    // Promise.race below listens to its rejection; once the race is over, 'stop' ends the
    // watcher without one.
    const panicked = waitFor(() => died !== null, 'a guest panic', 3_600_000).then(() => {
      if (died !== 'stop') throw new Error(`the guest died on the destination: ${died}`);
    });
    await Promise.race([workloadAfterInner(cell, serial, from, client), panicked]);
  } finally {
    clearInterval(watch);
    died ??= 'stop'; // ends the panic watcher's waitFor
  }
}

async function workloadAfterInner(cell: Cell, serial: string, from: number, client?: NetClient): Promise<void> {
  if (isMemcheck(cell.workload)) await waitPasses(serial, from, 1, 'on the destination after the migration');
  else if (cell.workload === 'disk') await waitDiskPasses(serial, from, 1, 'on the destination after the migration');
  if (client) await client.waitAnswers(5, 'after the migration', Date.now(), 60_000);
}

function readText(file: string): string {
  try {
    return fs.readFileSync(file, 'latin1');
  } catch {
    return '';
  }
}

export function keepLogs(c: Cluster, label: string): void {
  const dir = path.join(LOG_DIR, label);
  fs.mkdirSync(dir, { recursive: true });
  // vanilla QEMUs keep their files under the cluster dir (a short path: the QMP socket's must stay < 108 bytes)
  for (const side of ['src', 'dst']) {
    for (const f of ['serial.log', 'qemu.log']) {
      try {
        fs.copyFileSync(path.join(c.dir, 'vanilla', side, f), path.join(dir, `vanilla-${side}-${f}`));
      } catch {
        /* not a vanilla run */
      }
    }
  }
  copyClusterLogs(c, dir);
}
