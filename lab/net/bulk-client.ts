/**
 * Bulk TCP client of the network benchmark (tools/bench/net.ts), run in the client
 * namespace against the guest's netcheck:
 *
 *   ip netns exec <ns> node --import tsx lab/net/bulk-client.ts \
 *       --host 10.99.0.10 --port 7000 --dir g2c|c2g --size <bytes> --seconds <s>
 *
 * One connection; transfers of --size bytes one after another until --seconds have
 * passed (the last one is finished, not cut): g2c asks "B <seq> <size>" (the guest sends
 * a D record, then the payload), c2g sends "S <seq> <size>" and the payload (the guest
 * answers an R record once all arrived). Records are checked for type, seq and size;
 * payload bytes are counted, not stored. Prints one JSON line:
 *   {"dir","size","transfers","bytes","seconds","mbitPerS","transferMs":{"p50","p99"}}
 * or {"error": "..."} (exit 1).
 *
 * Why not lab/net/netclient.ts: that client proves a connection survives (every record checked
 * against a SHA-256 chain and counters by netcheck-verifier.ts, a request every interval, UDP
 * runs, JSON events for a test to wait on). This one measures throughput: transfers back to
 * back with nothing else on the connection, records checked for type, seq and size only, and
 * the client → guest direction (S/R), which netclient has no use for. Same guest program
 * (tools/guest/netcheck.c), two jobs.
 */
import net from 'node:net';
import { parseArgs } from 'node:util';

const { values: o } = parseArgs({
  options: {
    host: { type: 'string' },
    port: { type: 'string', default: '7000' },
    dir: { type: 'string', default: 'g2c' },
    size: { type: 'string', default: String(4 << 20) },
    seconds: { type: 'string', default: '3' },
  },
});
const dir = o.dir;
const size = Number(o.size);
const seconds = Number(o.seconds);
if (!o.host || (dir !== 'g2c' && dir !== 'c2g') || !(size > 0) || !(seconds > 0)) {
  process.stderr.write('usage: net-client --host H [--port P] --dir g2c|c2g --size N --seconds S\n');
  process.exit(2);
}

function fail(msg: string): never {
  process.stdout.write(JSON.stringify({ error: msg }) + '\n');
  process.exit(1);
}

const sock = net.createConnection({ host: o.host, port: Number(o.port), noDelay: true });
sock.on('error', (e) => fail(`socket: ${e.message}`));
sock.on('close', () => fail('connection closed by the guest'));

/** Lines of records; `payloadLeft` bytes of bulk payload (g2c) come before the next record. */
let lineBuf = '';
let payloadLeft = 0;
const payload = dir === 'c2g' ? Buffer.alloc(size, 0x61) : Buffer.alloc(0);
let seq = 0;
let started = 0;
let t0 = 0;
let bytes = 0;
const transferMs: number[] = [];
let transferStart = 0;

function next(): void {
  const now = performance.now();
  if (seq > 0) {
    transferMs.push(now - transferStart);
    bytes += size;
  }
  if (seq > 0 && now - t0 >= seconds * 1000) return done(now);
  seq++;
  transferStart = now;
  if (dir === 'g2c') sock.write(`B ${seq} ${size}\n`);
  else {
    sock.write(`S ${seq} ${size}\n`);
    sock.write(payload);
  }
}

function record(line: string): void {
  const f = line.split(' ');
  const [type, , rseq, , x] = f;
  if (type === 'H') {
    if (started++) fail(`second greeting: ${line}`);
    t0 = performance.now();
    return next();
  }
  if (Number(rseq) !== seq) fail(`record for seq ${rseq}, expected ${seq}: ${line}`);
  if (dir === 'g2c' && type === 'D' && Number(x) === size) {
    payloadLeft = size;
    return;
  }
  if (dir === 'c2g' && type === 'R' && Number(x) === size) return next();
  fail(`unexpected record: ${line}`);
}

sock.on('data', (chunk: Buffer) => {
  let pos = 0;
  while (pos < chunk.length) {
    if (payloadLeft > 0) {
      const k = Math.min(payloadLeft, chunk.length - pos);
      payloadLeft -= k;
      pos += k;
      if (payloadLeft === 0) next();
      continue;
    }
    const nl = chunk.indexOf(0x0a, pos);
    if (nl < 0) {
      lineBuf += chunk.toString('latin1', pos);
      if (lineBuf.length > 1024) fail('record line too long');
      return;
    }
    const line = lineBuf + chunk.toString('latin1', pos, nl);
    lineBuf = '';
    pos = nl + 1;
    record(line);
  }
});

function pct(v: number[], p: number): number {
  const s = [...v].sort((a, b) => a - b);
  return +s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!.toFixed(2);
}

function done(now: number): void {
  const secs = (now - t0) / 1000;
  process.stdout.write(
    JSON.stringify({
      dir,
      size,
      transfers: transferMs.length,
      bytes,
      seconds: +secs.toFixed(3),
      mbitPerS: +((bytes * 8) / secs / 1e6).toFixed(1),
      transferMs: { p50: pct(transferMs, 50), p99: pct(transferMs, 99) },
    }) + '\n',
  );
  sock.removeAllListeners('close');
  sock.destroy();
  process.exit(0);
}
