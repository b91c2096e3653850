/**
 * Diagnosis of gated TCP (issue 16): one gate cluster, migrate with hold-completion, then
 * bulk TCP in the window while sampling `ss -tin` in the client namespace and the
 * destination sidecar's metrics; tcpdump on the client side. Not a benchmark: notes.
 *   flock /tmp/tether-qemu.lock node --import tsx tools/bench/gated-diag.ts [--open] [--seconds 3] [--link 200mbit]
 * Writes /tmp/gdiag-<gated|open>[-<link>]/: per direction `ss -tin` samples (every 250 ms),
 * the client's nstat, the destination's gate/NIC counters; the gate's release log and
 * both daemons' logs (checkpoint timings).
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cluster } from '../../lab/cluster.ts';
import { GUEST_IP, NETCHECK_PORT, ROOT } from '../../lab/topology.ts';
import { waitFor } from '../../lab/proc.ts';
import { shapeLink, type Link } from './lib.ts';

const open = process.argv.includes('--open');
const seconds = Number(process.argv[process.argv.indexOf('--seconds') + 1] || 3);
const linkArg = process.argv.includes('--link') ? (process.argv[process.argv.indexOf('--link') + 1] as Link) : undefined;
const out = `/tmp/gdiag-${open ? 'open' : 'gated'}${linkArg ? `-${linkArg}` : ''}`;
fs.mkdirSync(out, { recursive: true });
const c = new Cluster({
  guestNet: 'gate',
  holdCompletion: true,
  env: { TETHER_GATE_LOG: '1' },
  vm: { memcheckMiB: 4, memcheckMBps: 1, memoryMiB: 256, intervalMs: 50, maxBandwidth: 1000 * 1024 * 1024, hotStandby: false },
});
const log = (s: string) => process.stderr.write(`[diag ${new Date().toISOString().slice(11, 23)}] ${s}\n`);
const run = (cmd: string, args: string[]) =>
  new Promise<string>((res) => execFile(cmd, args, { maxBuffer: 1 << 26 }, (_e, so, se) => res(String(so) + String(se))));
function metricLines(t: string): string {
  return t
    .split('\n')
    .filter((l) => /^tether_(gate|nic)_/.test(l) && !/ 0$/.test(l))
    .join('\n');
}
try {
  await c.up();
  const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
  if (r.code !== 0) throw new Error(r.stderr);
  await waitFor(() => /netcheck listening/.test(fs.readFileSync(c.serialLog(c.src), 'utf8')), 'netcheck', 180_000);
  if (open) {
    await c.termDaemon(c.dst);
    await c.restartDaemon(c.dst, { faults: 'gate-open' });
  }
  if (linkArg) shapeLink(c, linkArg);
  const mig = c.migrate();
  await waitFor(async () => ((await c.status(c.dst)).migration?.ackedEpoch ?? 0) >= 5, 'acked 5', 120_000);
  // all RAM has arrived (hold-completion holds the request): no post-copy faults in the sample
  await waitFor(() => /holding the completion request/.test(fs.readFileSync(c.dst.daemonLog, 'utf8')), 'all RAM', 180_000);
  log('in window');
  for (const dir of ['g2c', 'c2g'] as const) {
    const m0 = c.metrics(c.dst);
    await run('ip', ['netns', 'exec', c.clientNs, 'nstat', '-n']);
    const cli = run('ip', [
      'netns',
      'exec',
      c.clientNs,
      process.execPath,
      '--import',
      'tsx',
      `${ROOT}/lab/net/bulk-client.ts`,
      '--host',
      GUEST_IP,
      '--port',
      String(NETCHECK_PORT),
      '--dir',
      dir,
      '--size',
      '4194304',
      '--seconds',
      String(seconds),
    ]);
    let done = false;
    void cli.then(() => (done = true));
    const ss: string[] = [];
    while (!done) {
      ss.push(`@${Date.now()}\n` + (await run('ip', ['netns', 'exec', c.clientNs, 'ss', '-tin', 'dst', GUEST_IP])));
      await sleep(250);
    }
    log(`${dir}: ${(await cli).trim().split('\n').pop()}`);
    const ns = await run('ip', ['netns', 'exec', c.clientNs, 'nstat']);
    fs.writeFileSync(`${out}/${dir}.nstat.txt`, ns);
    log(`${dir} client nstat:\n${ns}`);
    fs.writeFileSync(`${out}/${dir}.ss.txt`, ss.join('\n'));
    const m1 = c.metrics(c.dst);
    fs.writeFileSync(`${out}/${dir}.metrics.txt`, `BEFORE\n${metricLines(m0)}\nAFTER\n${metricLines(m1)}\n`);
    log(`${dir} metrics after:\n${metricLines(m1)}`);
  }
  const st = await c.status(c.src);
  log(`src phase ${st.migration?.phase}`);
  fs.copyFileSync(`${c.dst.stateDir}/${c.vmName}/net0.gate.jsonl`, `${out}/gate.jsonl`);
  fs.copyFileSync(c.dst.daemonLog, `${out}/dst.log`);
  fs.copyFileSync(c.src.daemonLog, `${out}/src.log`);
  await c.tether(c.src, ['abort', c.vmName]);
  await mig;
} finally {
  await c.cleanup();
}
