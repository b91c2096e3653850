/**
 * The lab program (docs/lab.md): runs INSIDE the Debian lab guest (Debian's nodejs 18, the
 * Debian cloud kernel with CONFIG_MEM_SOFT_DIRTY=y), bundled by tools/lab/vm.ts from this
 * checkout with the host-built native addon. It drives labwriter (the stand-in for QEMU: a
 * process writing a MAP_SHARED tmpfs file) and runs tether's own trackers on it: the
 * production SoftDirtyTracker and ScanTracker classes, picked through createTracker.
 *
 *   node lab.mjs check DEV   the core cases (netns-tests/lab.test.ts asserts on them)
 *   node lab.mjs sweep DEV   pause vs dirty pages and vs RAM size, both trackers (npm run bench lab)
 *
 * DEV is the swap disk. Every result is one console line "LAB <json>".
 */
import { execFileSync, spawn, type ChildProcessByStdio } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import { closeSync, existsSync, mkdirSync, writeFileSync, openSync, readFileSync, readSync, readdirSync, rmSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { performance } from 'node:perf_hooks';
import { TetherError } from '../../src/errors.ts';
import { softDirtyProbe } from '../../src/native.ts';
import { decodePagemapEntry } from '../../src/memory/pagemap.ts';
import { hashRamFile } from '../../src/memory/ram.ts';
import { createTracker } from '../../src/memory/select.ts';
import { SoftDirtyTracker } from '../../src/memory/soft-dirty.ts';
import { ScanTracker } from '../../src/memory/scan.ts';
import type { DirtyTracker } from '../../src/memory/dirty-tracker.ts';

const WRITER = new URL('../labwriter', import.meta.url).pathname;
const PAGE = 4096;

function emit(o: Record<string, unknown>): void {
  process.stdout.write(`LAB ${JSON.stringify(o, (_k, v) => (typeof v === 'bigint' ? v.toString() : v))}\n`);
}

const writers = new Set<Writer>();

/** labwriter over its line protocol. */
class Writer {
  readonly proc: ChildProcessByStdio<Writable, Readable, null>;
  private readonly lines: string[] = [];
  private waiters: ((l: string) => void)[] = [];
  constructor() {
    this.proc = spawn(WRITER, [], { stdio: ['pipe', 'pipe', 'inherit'] });
    writers.add(this);
    this.proc.once('exit', () => writers.delete(this));
    createInterface({ input: this.proc.stdout }).on('line', (l) => {
      const w = this.waiters.shift();
      if (w) w(l);
      else this.lines.push(l);
    });
  }
  get pid(): number {
    return this.proc.pid!;
  }
  async cmd(line: string): Promise<string> {
    this.proc.stdin.write(line + '\n');
    const l = this.lines.shift() ?? (await new Promise<string>((r) => this.waiters.push(r)));
    if (!l.startsWith('ok')) throw new Error(`labwriter: ${line.slice(0, 60)}: ${l}`);
    return l.slice(3);
  }
  async write(epoch: number, pfns: Iterable<number>): Promise<void> {
    const all = [...pfns];
    for (let i = 0; i < all.length; i += 4096) await this.cmd(`w ${epoch} ${all.slice(i, i + 4096).join(' ')}`);
  }
  /** The VM pause (QMP stop) equivalent: SIGSTOP, then wait until every thread is stopped. */
  async stop(): Promise<void> {
    process.kill(this.pid, 'SIGSTOP');
    for (;;) {
      const states = readdirSync(`/proc/${this.pid}/task`).map((t) => {
        try {
          return readFileSync(`/proc/${this.pid}/task/${t}/stat`, 'utf8').replace(/^.*\) /s, '')[0];
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'ENOENT') return 'T'; // the thread has exited: it writes no more
          throw e;
        }
      });
      if (states.every((s) => s === 'T' || s === 't')) return;
      await new Promise((r) => setTimeout(r, 1));
    }
  }
  cont(): void {
    process.kill(this.pid, 'SIGCONT');
  }
  async quit(): Promise<void> {
    await this.cmd('quit');
    await new Promise((r) => this.proc.once('exit', r));
  }
}

/** Deterministic pseudo-random pfn sets. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}
function randomSet(r: () => number, pages: number, n: number): number[] {
  const s = new Set<number>();
  while (s.size < Math.min(n, pages)) s.add(r() % pages);
  return [...s].sort((a, b) => a - b);
}

function diff(a: ArrayLike<number>, b: ArrayLike<number>): number[] {
  const s = new Set(Array.from(b));
  return Array.from(a).filter((x) => !s.has(x));
}

function pagemapEntry(pid: number, addr: bigint, pfn: number): ReturnType<typeof decodePagemapEntry> {
  const buf = Buffer.alloc(8);
  const h = openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    readSync(h, buf, 0, 8, Number((addr / BigInt(PAGE) + BigInt(pfn)) * 8n));
  } finally {
    closeSync(h);
  }
  return decodePagemapEntry(buf.readBigUInt64LE(0));
}

function smapsOf(pid: number, path: string): Record<string, string> {
  const text = readFileSync(`/proc/${pid}/smaps`, 'utf8');
  const out: Record<string, string> = {};
  let inside = false;
  for (const line of text.split('\n')) {
    if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) inside = line.endsWith(path);
    else if (inside) {
      const m = /^(\w+):\s+(.*)$/.exec(line);
      if (m) out[m[1]!] = m[2]!;
    }
  }
  return out;
}

interface Ram {
  w: Writer;
  path: string;
  pages: number;
  addr: bigint;
  table: Buffer;
}

/** A fresh writer with its RAM file written everywhere (epoch 1), and S's table of it. */
async function setupRam(path: string, pages: number, huge = false, cgroup?: string): Promise<Ram> {
  const w = new Writer();
  // Into the cgroup before it touches a page: its pages are charged there (memory.reclaim).
  if (cgroup) writeFileSync(`${cgroup}/cgroup.procs`, String(w.pid));
  const addr = BigInt(await w.cmd(`open ${path} ${pages} ${huge ? 1 : 0}`));
  await w.cmd(`wr 1 0 ${pages} 1`);
  const table = await hashRamFile(path, pages * PAGE);
  return { w, path, pages, addr, table };
}

/**
 * The trackers through tether's own selector (createTracker), or, `unguarded`, built directly
 * with the reclaim precondition skipped (what that check prevents, shown by the reclaim case).
 */
async function trackers(ram: Ram, kinds: ('soft-dirty' | 'scan')[], unguarded = false): Promise<DirtyTracker[]> {
  const out: DirtyTracker[] = [];
  for (const k of kinds) {
    const opts = { ramPath: ram.path, ramBytes: ram.pages * PAGE, qemuPid: ram.w.pid };
    const t = !unguarded
      ? await createTracker(k, opts)
      : k === 'soft-dirty'
        ? await SoftDirtyTracker.open({ ...opts, skipPreconditions: true }, 'lab: unguarded')
        : await ScanTracker.open(opts, 'lab');
    await t.start(Buffer.from(ram.table));
    const first = await t.collect(); // the first collect scans everything: nothing changed since the table
    if (first.length !== 0) throw new Error(`${k}: first collect found ${first.length} pages`);
    out.push(t);
  }
  return out;
}

function candidates(t: DirtyTracker): number | undefined {
  return (t as { stats?: { lastCandidates: number } }).stats?.lastCandidates;
}

/** Epochs of known writes; per epoch both trackers' sets against the truth. */
async function epochs(name: string, path: string, pages: number, huge: boolean): Promise<void> {
  const ram = await setupRam(path, pages, huge);
  // On a THP mount tether refuses soft-dirty (collapse, see collapse()): built unguarded here
  // to show that huge pages themselves are tracked (per PMD).
  const [sd, sc] = await trackers(ram, ['soft-dirty', 'scan'], huge);
  const r = rng(7);
  const plans: number[][] = [
    [],
    [0],
    [pages - 1],
    [1, 2, 3, 511, 512, 513],
    randomSet(r, pages, 10),
    randomSet(r, pages, 300),
    Array.from({ length: 1024 }, (_v, i) => 4096 + i),
    randomSet(r, pages, Math.floor(pages / 4)),
  ];
  let epoch = 2;
  for (const truth of plans) {
    await ram.w.write(epoch, truth);
    const s = Array.from(await sd!.collect());
    const c = Array.from(await sc!.collect());
    emit({
      case: name,
      epoch,
      written: truth.length,
      softDirty: s.length,
      softDirtyCandidates: candidates(sd!),
      scan: c.length,
      missedSoftDirty: diff(truth, s).length,
      extraSoftDirty: diff(s, truth).length,
      missedScan: diff(truth, c).length,
      extraScan: diff(c, truth).length,
      ...(huge ? { shmemPmdMapped: smapsOf(ram.w.pid, path)['ShmemPmdMapped'] } : {}),
    });
    epoch++;
  }
  if (huge) emit({ case: name, smaps: pick(smapsOf(ram.w.pid, path), ['THPeligible', 'FilePmdMapped', 'ShmemPmdMapped', 'Rss']) });
  await sd!.close();
  await sc!.close();
  await ram.w.quit();
}

function pick(o: Record<string, string>, keys: string[]): Record<string, string | undefined> {
  return Object.fromEntries(keys.map((k) => [k, o[k]]));
}

/**
 * A page written in an epoch, then reclaimed (MADV_PAGEOUT to swap) and faulted back by a
 * read before the checkpoint. `locked`: the mapping mlocked first.
 */
async function reclaim(path: string, locked: boolean, unguarded = false): Promise<void> {
  const pages = 4096;
  const cg = labCgroup();
  const ram = await setupRam(path, pages, false, cg);
  if (locked) await ram.w.cmd('mlock');
  const [sd, sc] = await trackers(ram, ['soft-dirty', 'scan'], unguarded);
  const P = 1234;
  await ram.w.write(2, [P, P + 1]);
  const afterWrite = pagemapEntry(ram.w.pid, ram.addr, P);
  // MADV_PAGEOUT first; 6.1 accepts it on shmem but does not page shmem out (incore stays 1),
  // so then the cgroup's memory.reclaim (5.19+), which does.
  const pageout = Number(await ram.w.cmd(`pageout ${P} 1`));
  const incoreAfterPageout = Number(await ram.w.cmd(`incore ${P} 1`));
  let reclaimError = '';
  try {
    writeFileSync(`${cg}/memory.reclaim`, `${pages * PAGE * 2}`);
  } catch (e) {
    reclaimError = (e as NodeJS.ErrnoException).code ?? String(e); // EAGAIN: less than asked (fine)
  }
  const incoreAfterReclaim = Number(await ram.w.cmd(`incore ${P} 1`));
  const swapUsedKiB = Number(readFileSync('/proc/swaps', 'utf8').trim().split('\n')[1]?.split(/\s+/)[3] ?? 0);
  const afterPageout = pagemapEntry(ram.w.pid, ram.addr, P);
  const readBack = BigInt(await ram.w.cmd(`r ${P} 2`));
  const afterRead = pagemapEntry(ram.w.pid, ram.addr, P);
  const s = Array.from(await sd!.collect());
  const c = Array.from(await sc!.collect());
  emit({
    case: locked ? 'reclaim-mlocked' : 'reclaim',
    page: P,
    pageoutErrno: pageout,
    incoreAfterPageout,
    reclaimError,
    incoreAfterReclaim,
    swapUsedKiB,
    vmFlags: smapsOf(ram.w.pid, path)['VmFlags'],
    afterWrite,
    afterPageout,
    afterRead,
    readBack,
    readBackOk: readBack === ((2n << 32n) | BigInt(P)),
    softDirty: s,
    scan: c,
    softDirtyCandidates: candidates(sd!),
    missedSoftDirty: diff([P, P + 1], s),
    missedScan: diff([P, P + 1], c),
  });
  await sd!.close();
  await sc!.close();
  await ram.w.quit();
}

/** MADV_COLLAPSE (6.1) of small shmem pages into a THP, then a read: khugepaged does the same. */
async function collapse(path: string): Promise<void> {
  const pages = 2048; // 8 MiB
  const ram = await setupRam(path, pages);
  const [sd, sc] = await trackers(ram, ['soft-dirty', 'scan'], true);
  const P = 700;
  await ram.w.write(2, [P]);
  const rc = Number(await ram.w.cmd(`collapse ${512} ${512}`));
  const afterCollapse = pagemapEntry(ram.w.pid, ram.addr, P);
  await ram.w.cmd(`r ${P} 2`);
  const afterRead = pagemapEntry(ram.w.pid, ram.addr, P);
  const s = Array.from(await sd!.collect());
  const c = Array.from(await sc!.collect());
  emit({
    case: 'collapse',
    page: P,
    collapseErrno: rc,
    afterCollapse,
    afterRead,
    smaps: pick(smapsOf(ram.w.pid, path), ['THPeligible', 'FilePmdMapped', 'ShmemPmdMapped']),
    softDirty: s,
    scan: c,
    missedSoftDirty: diff([P], s),
    missedScan: diff([P], c),
  });
  await sd!.close();
  await sc!.close();
  await ram.w.quit();
}

/**
 * clear_refs racing writes: labwriter's thread writes every page once, in order, while the
 * tracker collects over and over. paused: each collect runs with the writer SIGSTOPped
 * (tether's rule: collect only while the VM is paused); unpaused: the writes race the
 * tracker's pagemap read and clear_refs. After the pass and a last collect, the tracker's
 * table (S's copy as D believes it) must equal the RAM file's real hashes: a mismatching
 * page is a write the tracker lost, and with each page written once it is never re-marked.
 */
async function race(path: string, paused: boolean, gapUs: number): Promise<void> {
  const pages = 4096;
  const ram = await setupRam(path, pages);
  const [sd] = await trackers(ram, ['soft-dirty']);
  const table = (sd as unknown as { state: { table: Buffer } }).state.table;
  await ram.w.cmd(`spin ${gapUs}`);
  let reported = 0;
  let rounds = 0;
  while (Number(await ram.w.cmd('spun')) < pages) {
    if (paused) await ram.w.stop();
    reported += (await sd!.collect()).length;
    if (paused) ram.w.cont();
    rounds++;
  }
  const writes = Number(await ram.w.cmd('halt'));
  reported += (await sd!.collect()).length;
  const truth = await hashRamFile(path, pages * PAGE);
  let lost = 0;
  for (let p = 0; p < pages; p++) if (!truth.subarray(p * 8, p * 8 + 8).equals(table.subarray(p * 8, p * 8 + 8))) lost++;
  emit({ case: paused ? 'race-paused' : 'race-unpaused', rounds, writes, reported, lost });
  await sd!.close();
  await ram.w.quit();
}

/** tether's precondition: soft-dirty refused while swap is on and the RAM is not mlocked. */
async function precondition(path: string, swapOn: boolean, huge = false): Promise<void> {
  for (const locked of huge ? [false] : [false, true]) {
    // 4 MiB: a mapping smaller than one 2 MiB huge page is never THP-eligible.
    const ram = await setupRam(path, 1024, huge);
    if (locked) await ram.w.cmd('mlock');
    const opts = { ramPath: path, ramBytes: 1024 * PAGE, qemuPid: ram.w.pid };
    let code = 'none';
    try {
      const t = await createTracker('soft-dirty', opts);
      await t.close();
    } catch (e) {
      code = e instanceof TetherError ? e.code : String(e);
    }
    const auto = await createTracker('auto', opts);
    const probe = await SoftDirtyTracker.open({ ...opts, skipPreconditions: true });
    const flags = await probe.ramMappingFlags();
    await probe.close();
    emit({
      case: 'precondition',
      path,
      swapOn,
      locked,
      flags,
      vmFlags: smapsOf(ram.w.pid, path)['VmFlags'],
      softDirtyError: code,
      auto: auto.kind,
      autoReason: auto.reason,
    });
    await auto.close();
    await ram.w.quit();
  }
}

/** A memory cgroup for the reclaim case (cgroup v2 mounted here if nothing is). */
function labCgroup(): string {
  const root = '/sys/fs/cgroup';
  if (!existsSync(`${root}/cgroup.controllers`)) execFileSync('mount', ['-t', 'cgroup2', 'none', root]);
  writeFileSync(`${root}/cgroup.subtree_control`, '+memory');
  mkdirSync(`${root}/lab`, { recursive: true });
  return `${root}/lab`;
}

function swapon(dev: string): void {
  execFileSync('mkswap', ['-q', dev]);
  execFileSync('swapon', [dev]);
}

async function check(dev: string): Promise<void> {
  const probe = softDirtyProbe();
  emit({ case: 'probe', ...probe, swaps: readFileSync('/proc/swaps', 'utf8').trim().split('\n').length - 1 });
  emit({
    case: 'thp-settings',
    enabled: readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8').trim(),
    shmem: readFileSync('/sys/kernel/mm/transparent_hugepage/shmem_enabled', 'utf8').trim(),
  });
  await epochs('epochs', '/dev/shm/ram', 16384, false);
  mkdirSync('/mnt/thp', { recursive: true });
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'huge=always,size=128m', 'tmpfs', '/mnt/thp']);
  await epochs('thp', '/mnt/thp/ram', 16384, true);
  await precondition('/mnt/thp/pre', false, true);
  await precondition('/dev/shm/pre', false);
  await race('/dev/shm/race', true, 100);
  await race('/dev/shm/race2', false, 100);
  mkdirSync('/mnt/thpadv', { recursive: true });
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'huge=advise,size=64m', 'tmpfs', '/mnt/thpadv']);
  await collapse('/mnt/thpadv/collapse');
  swapon(dev);
  emit({ case: 'swap', swaps: readFileSync('/proc/swaps', 'utf8').trim() });
  await precondition('/dev/shm/pre2', true);
  await reclaim('/dev/shm/reclaim', false, true);
  await reclaim('/dev/shm/reclaim2', true);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function sweep(): Promise<void> {
  const runs = 5;
  for (const mib of [64, 256, 512]) {
    const pages = (mib * 1024 * 1024) / PAGE;
    const ram = await setupRam(`/dev/shm/sweep${mib}`, pages);
    const [sd, sc] = await trackers(ram, ['soft-dirty', 'scan']);
    const r = rng(mib);
    let epoch = 2;
    for (const dirty of [...new Set([16, 256, 4096, Math.floor(pages / 4)])]) {
      const tSd: number[] = [];
      const tSc: number[] = [];
      let cand = 0;
      for (let i = 0; i < runs; i++) {
        await ram.w.write(epoch++, randomSet(r, pages, dirty));
        let t0 = performance.now();
        const a = await sd!.collectPages();
        tSd.push(performance.now() - t0);
        cand = candidates(sd!) ?? 0;
        t0 = performance.now();
        const b = await sc!.collectPages();
        tSc.push(performance.now() - t0);
        if (a.pfns.length !== dirty || b.pfns.length !== dirty) {
          throw new Error(`sweep ${mib} MiB: wrote ${dirty}, soft-dirty ${a.pfns.length}, scan ${b.pfns.length}`);
        }
      }
      emit({
        case: 'sweep',
        ramMiB: mib,
        dirtyPages: dirty,
        runs,
        softDirtyMs: +median(tSd).toFixed(2),
        softDirtyCandidates: cand,
        scanMs: +median(tSc).toFixed(2),
      });
    }
    await sd!.close();
    await sc!.close();
    await ram.w.quit();
    rmSync(`/dev/shm/sweep${mib}`);
  }
}

const [mode = 'check', dev = '/dev/vdc'] = process.argv.slice(2);
try {
  if (mode === 'sweep') await sweep();
  else await check(dev);
  emit({ case: 'done' });
} catch (e) {
  emit({ case: 'error', error: e instanceof Error ? `${(e as { code?: string }).code ?? ''} ${e.stack}` : String(e) });
  process.exitCode = 1;
} finally {
  for (const w of writers) w.proc.kill('SIGKILL');
}
