/**
 * netclient: keeps one verified conversation with the guest's netcheck going and
 * reports, as JSON lines on stdout, every answer and every violation. Reconnect policy:
 * none — the point is that the SAME TCP connection survives migrations and rollbacks.
 *
 *   ip netns exec <ns> node --import tsx lab/net/netclient.ts \
 *       --host 10.99.0.10 --port 7000 [--interval-ms 100] [--stall-ms 45000] [--udp-port 7001]
 *
 * stdin commands (one per line): "udp <count> <size>" (the guest floods datagrams to
 * --udp-port, the client checks they all arrive in order), "bulk <nbytes>", "frames
 * <count> <size>" (the guest sends raw Ethernet frames of that size: a hostile guest's
 * runts and maximal frames, watched on the wire by the test), "stop".
 *
 * stdout events ({"t": ms since epoch, "ev": ...}):
 *   connected, hello {id}, answer {seq, counter, rttMs}, bulk {seq, nbytes, ms},
 *   udp {seq, sent, received, gaps, reordered, rcvbufErrors}, frames {seq, sent}, stall {sinceMs},
 *   resumed {afterMs}, violation {kind, ...}, closed {reason}, summary {...}
 * A stall (no answer for --stall-ms while requests are outstanding) is reported as a
 * violation of kind "stall": the connection is lost for the client's purposes.
 *
 * Started and followed by lab/net/driver.ts (Cluster.netclient()). Throughput is measured by
 * lab/net/bulk-client.ts instead (its header says how the two differ).
 */
import dgram from 'node:dgram';
import fs from 'node:fs';
import net from 'node:net';
import readline from 'node:readline';
import { parseArgs } from 'node:util';
import { ConversationVerifier } from './netcheck-verifier.ts';

const { values: o } = parseArgs({
  options: {
    host: { type: 'string' },
    port: { type: 'string', default: '7000' },
    'interval-ms': { type: 'string', default: '100' },
    'stall-ms': { type: 'string', default: '45000' },
    'udp-port': { type: 'string', default: '7001' },
    'max-outstanding': { type: 'string', default: '64' },
  },
});
if (!o.host) {
  process.stderr.write('netclient: --host is required\n');
  process.exit(2);
}
const intervalMs = Number(o['interval-ms']);
const stallMs = Number(o['stall-ms']);
const maxOutstanding = Number(o['max-outstanding']);

const emit = (ev: string, fields: Record<string, unknown> = {}) =>
  process.stdout.write(JSON.stringify({ t: Date.now(), ev, ...fields }) + '\n');

const v = new ConversationVerifier();
const sentAt = new Map<number, number>();
let seq = 0;
let answers = 0;
let violations = 0;
let lastProgress = Date.now();
let stalled = false;
let closed = false;
let bulk: { seq: number; nbytes: number; left: number; start: number } | null = null;
const udpRuns = new Map<number, { next: number; received: number; gaps: number; reordered: number }>();

function violation(kind: string, fields: Record<string, unknown> = {}): void {
  violations++;
  emit('violation', { kind, ...fields });
}

function udpRcvbufErrors(): number {
  // Per-namespace UDP counters: a datagram the client's own socket dropped is not a loss
  // on the wire, so report it beside the count.
  const lines = fs
    .readFileSync('/proc/net/snmp', 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('Udp:'));
  const names = lines[0]?.split(/\s+/) ?? [];
  const vals = lines[1]?.split(/\s+/) ?? [];
  return Number(vals[names.indexOf('RcvbufErrors')] ?? 0);
}

const udp = dgram.createSocket({ type: 'udp4', recvBufferSize: 8 << 20 });
udp.on('message', (msg) => {
  // "u <connid> <seq> <i> <count> ...."
  const f = msg.subarray(0, 80).toString('latin1').split(' ');
  const run = udpRuns.get(Number(f[2]));
  if (!run) return;
  const i = Number(f[3]);
  run.received++;
  if (i > run.next) run.gaps += i - run.next;
  if (i < run.next) run.reordered++;
  run.next = Math.max(run.next, i + 1);
});
udp.bind(Number(o['udp-port']));

const sock = net.createConnection({ host: o.host, port: Number(o.port), noDelay: true });
sock.on('connect', () => emit('connected', { local: `${sock.localAddress}:${sock.localPort}` }));
sock.on('data', (chunk: Buffer) => {
  for (const r of v.push(chunk)) {
    if ('violation' in r) {
      violation(r.violation.kind, { ...r.violation });
      continue;
    }
    if ('payload' in r) {
      if (bulk) {
        bulk.left -= r.payload;
        if (bulk.left === 0) {
          emit('bulk', { seq: bulk.seq, nbytes: bulk.nbytes, ms: Date.now() - bulk.start });
          bulk = null;
        }
      }
      progress();
      continue;
    }
    const rec = r.record;
    progress();
    if (rec.type === 'H') emit('hello', { id: rec.x });
    else if (rec.type === 'A') {
      answers++;
      emit('answer', { seq: rec.seq, counter: rec.counter, rttMs: Date.now() - (sentAt.get(rec.seq) ?? Date.now()) });
    } else if (rec.type === 'D') {
      const nbytes = Number(rec.x);
      if (nbytes === 0) emit('bulk', { seq: rec.seq, nbytes, ms: Date.now() - (sentAt.get(rec.seq) ?? Date.now()) });
      else bulk = { seq: rec.seq, nbytes, left: nbytes, start: sentAt.get(rec.seq) ?? Date.now() };
    } else if (rec.type === 'W') emit('frames', { seq: rec.seq, sent: Number(rec.x) });
    else if (rec.type === 'V') {
      const run = udpRuns.get(rec.seq);
      // The datagrams left the guest before this record did (one NIC queue, in order);
      // give the local socket a moment to hand over the last ones.
      setTimeout(() => {
        emit('udp', { seq: rec.seq, sent: Number(rec.x), ...run, rcvbufErrors: udpRcvbufErrors() });
        udpRuns.delete(rec.seq);
      }, 500);
    }
    sentAt.delete(rec.seq);
  }
});
sock.on('error', (e: NodeJS.ErrnoException) => {
  if (!closed) violation('connection-lost', { code: e.code, message: e.message });
});
sock.on('close', () => {
  if (!closed) {
    closed = true;
    violation('connection-closed');
  }
  finish('connection closed');
});

function progress(): void {
  if (stalled) {
    stalled = false;
    emit('resumed', { afterMs: Date.now() - lastProgress });
  }
  lastProgress = Date.now();
}

function send(line: string, s: number): void {
  sentAt.set(s, Date.now());
  v.expect(s);
  sock.write(line + '\n');
}

const tick = setInterval(() => {
  if (closed || sock.connecting) return;
  if (v.pending.length > 0 && !stalled && Date.now() - lastProgress > stallMs) {
    stalled = true;
    violation('stall', { sinceMs: Date.now() - lastProgress, outstanding: v.pending.length });
  }
  if (v.pending.length >= maxOutstanding) return;
  if (v.pending.length === 0) lastProgress = Date.now();
  seq++;
  send(`Q ${seq} t${seq.toString(36)}`, seq);
}, intervalMs);

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const f = line.trim().split(/\s+/);
  if (f[0] === 'stop') finish('stopped');
  else if (f[0] === 'udp') {
    seq++;
    udpRuns.set(seq, { next: 0, received: 0, gaps: 0, reordered: 0 });
    send(`U ${seq} ${o['udp-port']} ${Number(f[1])} ${Number(f[2] ?? 1000)}`, seq);
  } else if (f[0] === 'frames') {
    seq++;
    send(`F ${seq} ${Number(f[1])} ${Number(f[2])}`, seq);
  } else if (f[0] === 'bulk') {
    seq++;
    send(`B ${seq} ${Number(f[1])}`, seq);
  }
});

let finished = false;
function finish(reason: string): void {
  if (finished) return;
  finished = true;
  clearInterval(tick);
  emit('summary', { reason, answers, violations, counter: v.counter, pending: v.pending.length });
  closed = true;
  sock.destroy();
  udp.close();
  setTimeout(() => process.exit(0), 50);
}
process.on('SIGTERM', () => finish('SIGTERM'));
