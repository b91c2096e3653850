/**
 * Packet-gate benchmark: `npm run bench gate [-- --seconds 3]` (root; runs in its own
 * network namespace: it re-executes itself under `unshare -n`).
 *
 * 1. Read path, TAP → sidecar (decides how the sidecar reads its TAP): a writer thread
 *    process injects frames into TAP A; the kernel bridge floods them to TAP B, which the
 *    sidecar reads either with the native reader thread (poll + read until EAGAIN,
 *    one N-API call per batch) or with Node's thread-pool fs.read, one frame per call.
 * (The gate's capacity inside the destination's window is measured end to end, guest to
 * client through QEMU's filter-redirectors and the relay, by `npm run bench net`.)
 * Prints frames/s and Mbit/s and writes
 * bench-results/gate.json.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { cpus, release } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadNative } from '../../src/native.ts';
import { TapDevice } from '../../src/net/tap.ts';
import { nullLogger } from '../../src/util/log.ts';

const SELF = fileURLToPath(import.meta.url);
const ROOT = path.resolve(path.dirname(SELF), '../..');

function frame(size: number, seq = 0): Buffer {
  const f = Buffer.alloc(size, 0x5a);
  f.fill(0xff, 0, 6); // broadcast: the bridge floods it
  Buffer.from([0x52, 0x54, 0x00, 0xbe, 0x00, 0x01]).copy(f, 6);
  f.writeUInt16BE(0x88b5, 12); // local experimental ethertype: the host stack ignores it
  f.writeUInt32BE(seq, 14);
  return f;
}

// ---------------------------------------------------------------- load generator (child process)

interface Job {
  kind: 'tap-writer';
  size: number;
  seconds: number;
}

/** The frame source runs in its own process (its own core when there is one). */
async function generatorMain(job: Job): Promise<void> {
  const report = (m: object): void => void process.stdout.write(JSON.stringify(m) + '\n');
  const until = performance.now() + job.seconds * 1000;
  // the TAP's fd is inherited as fd 3
  const b = loadNative() as unknown as { tapWriteBatch(fd: number, f: Buffer[]): number };
  const batch = Array.from({ length: 64 }, (_, i) => frame(job.size, i));
  let sent = 0;
  while (performance.now() < until) sent += b.tapWriteBatch(3, batch);
  report({ sent });
}

function runGenerator(job: Job, opts: { fd?: number; onListening?: () => void } = {}): Promise<{ sent: number }> {
  return new Promise((resolve, reject) => {
    const stdio: ('ignore' | 'pipe' | 'inherit' | number)[] = ['ignore', 'pipe', 'inherit'];
    if (opts.fd !== undefined) stdio.push(opts.fd);
    const p = spawn(process.execPath, [...process.execArgv, SELF], {
      stdio,
      env: { ...process.env, TETHER_BENCH_JOB: JSON.stringify(job) },
    });
    let buf = '';
    let result: { sent: number } | undefined;
    p.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const m = JSON.parse(buf.slice(0, nl)) as { sent?: number; listening?: boolean };
        buf = buf.slice(nl + 1);
        if (m.listening) opts.onListening?.();
        else result = { sent: m.sent! };
      }
    });
    p.on('error', reject);
    p.on('close', (code) => (result ? resolve(result) : reject(new Error(`frame generator exited ${code}`))));
  });
}

// ---------------------------------------------------------------- main side

const sh = (...a: string[]): string => execFileSync(a[0]!, a.slice(1), { encoding: 'utf8' });

interface Row {
  test: string;
  method: string;
  frameBytes: number;
  framesPerS: number;
  mbitPerS: number;
  offeredFramesPerS?: number;
}

async function readPath(size: number, seconds: number, method: 'native-batched' | 'fs.read-per-frame'): Promise<Row> {
  const w = await TapDevice.open('bw', 'brb');
  const r = await TapDevice.open(method === 'native-batched' ? 'brn' : 'brf', 'brb', { nonblock: method === 'native-batched' });
  sh('ip', 'link', 'set', 'dev', r.name, 'txqueuelen', '10000');
  let got = 0;
  let stop = false;
  if (method === 'native-batched') {
    r.startReading((fs) => (got += fs.length));
  } else {
    // one frame per fs.read on a blocking fd: a libuv pool thread per outstanding read
    const buf = Buffer.alloc(65600);
    const loop = (): void => {
      if (stop) return;
      fs.read(r.fd, buf, 0, buf.length, null, (err) => {
        if (!err) got++;
        loop();
      });
    };
    loop();
  }
  await new Promise((res) => setTimeout(res, 200));
  const t0 = performance.now();
  const before = got;
  const { sent } = await runGenerator({ kind: 'tap-writer', size, seconds }, { fd: w.fd });
  const dt = (performance.now() - t0) / 1000;
  await new Promise((res) => setTimeout(res, 200));
  const n = got - before;
  stop = true;
  if (method === 'native-batched') await r.close(true);
  else {
    // a pool thread blocked in read() wakes only for a frame: send one, then close
    w.write([frame(size)]);
    await new Promise((res) => setTimeout(res, 100));
    (loadNative() as unknown as { tapClose(fd: number, rm: boolean): void }).tapClose(r.fd, true);
  }
  await w.close(true);
  return {
    test: 'read TAP (bridge-flooded frames)',
    method,
    frameBytes: size,
    framesPerS: Math.round(n / dt),
    mbitPerS: +((n * size * 8) / dt / 1e6).toFixed(1),
    offeredFramesPerS: Math.round(sent / dt),
  };
}

async function main(): Promise<void> {
  if (!process.env.TETHER_BENCH_NETNS) {
    const r = spawnSync('unshare', ['-n', process.execPath, ...process.execArgv, SELF, ...process.argv.slice(2)], {
      stdio: 'inherit',
      env: { ...process.env, TETHER_BENCH_NETNS: '1' },
    });
    process.exit(r.status ?? 1);
  }
  const i = process.argv.indexOf('--seconds');
  const seconds = i > 0 ? Number(process.argv[i + 1]) : 3;
  sh('ip', 'link', 'set', 'lo', 'up');
  sh('ip', 'link', 'add', 'brb', 'type', 'bridge');
  sh('ip', 'link', 'set', 'brb', 'up');
  const rows: Row[] = [];
  for (const size of [64, 1500]) {
    for (const m of ['native-batched', 'fs.read-per-frame'] as const) rows.push(await readPath(size, seconds, m));
  }
  const TARGET = 1000;
  console.log('test | method | frame bytes | frames/s | Mbit/s | target');
  for (const r of rows) {
    const target =
      r.test.startsWith('gate') && r.frameBytes === 1500 ? `>= ${TARGET} Mbit/s ${r.mbitPerS >= TARGET ? 'MET' : 'MISSED'}` : '';
    console.log(
      `${r.test} | ${r.method} | ${r.frameBytes} | ${r.framesPerS}${r.offeredFramesPerS ? ` (offered ${r.offeredFramesPerS})` : ''} | ${r.mbitPerS} | ${target}`,
    );
  }
  const out = path.join(ROOT, 'bench-results');
  fs.mkdirSync(out, { recursive: true });
  fs.writeFileSync(
    path.join(out, 'gate.json'),
    JSON.stringify(
      { bench: 'gate', date: new Date().toISOString(), seconds, cpus: cpus().length, kernel: release(), targetMbitAt1500: TARGET, rows },
      null,
      2,
    ) + '\n',
  );
  console.log(`wrote ${path.join(out, 'gate.json')}`);
}

if (process.env.TETHER_BENCH_JOB) await generatorMain(JSON.parse(process.env.TETHER_BENCH_JOB) as Job);
else {
  await main();
  process.exit(0); // nothing may keep the namespace alive
}
