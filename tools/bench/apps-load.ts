/**
 * Load client of the real-application benchmark (tools/bench/apps.ts), run in the client
 * namespace against the Debian guest:
 *
 *   ip netns exec <ns> node --import tsx tools/bench/apps-load.ts \
 *       --kind memcached|nginx --host 10.99.0.10 --conns 8
 *
 * --conns connections, each a closed loop with one request in flight: memcached alternates
 * `set` of a 64-byte value and `get` of that key (the value read must be the one set);
 * nginx GETs --path over HTTP/1.1 keep-alive. Runs until its stdin ends. Prints, every
 * 100 ms, one line per completed request: "<end time, ms since the epoch> <latency ms>",
 * and "E <ms> <message>" per error (the connection is opened again 100 ms later).
 */
import net from 'node:net';
import { parseArgs } from 'node:util';

const { values: o } = parseArgs({
  options: {
    kind: { type: 'string' },
    host: { type: 'string' },
    conns: { type: 'string', default: '8' },
    path: { type: 'string', default: '/big.bin.sha256' },
  },
});
const conns = Number(o.conns);
if (!o.host || (o.kind !== 'memcached' && o.kind !== 'nginx') || !(conns > 0)) {
  process.stderr.write('usage: apps-load --kind memcached|nginx --host H [--conns N] [--path P]\n');
  process.exit(2);
}
const host = o.host;
const kind = o.kind;
const port = kind === 'memcached' ? 11211 : 80;
const wall = (): number => performance.timeOrigin + performance.now();

let out: string[] = [];
const flush = (): void => {
  if (out.length) process.stdout.write(out.join(''));
  out = [];
};
const flusher = setInterval(flush, 100);
let stopping = false;
process.stdin.resume();
process.stdin.on('end', () => {
  stopping = true;
  clearInterval(flusher);
  flush();
  process.exit(0);
});

/**
 * One request's parser over the bytes received: the length of a complete answer at the
 * start of `buf`, or -1 if more bytes are needed; throws on a wrong answer.
 */
type Parser = (buf: Buffer) => number;

function memcachedRequest(conn: number, seq: number): { req: Buffer; parse: Parser } {
  const key = `bench-${process.pid}-${conn}`;
  const value = `${seq}`.padStart(64, 'v');
  if (seq % 2 === 0) {
    return {
      req: Buffer.from(`set ${key} 0 0 ${value.length}\r\n${value}\r\n`),
      parse: (b) => {
        const nl = b.indexOf('\r\n');
        if (nl < 0) return -1;
        const line = b.subarray(0, nl).toString('latin1');
        if (line !== 'STORED') throw new Error(`set answered ${line}`);
        return nl + 2;
      },
    };
  }
  const want = `${seq - 1}`.padStart(64, 'v');
  return {
    req: Buffer.from(`get ${key}\r\n`),
    parse: (b) => {
      const end = b.indexOf('END\r\n');
      if (end < 0) return -1;
      const text = b.subarray(0, end).toString('latin1');
      if (!text.includes(`\r\n${want}\r\n`)) throw new Error(`get read ${JSON.stringify(text.slice(0, 120))}`);
      return end + 5;
    },
  };
}

function nginxRequest(): { req: Buffer; parse: Parser } {
  return {
    req: Buffer.from(`GET ${o.path} HTTP/1.1\r\nHost: ${host}\r\n\r\n`),
    parse: (b) => {
      const h = b.indexOf('\r\n\r\n');
      if (h < 0) return -1;
      const head = b.subarray(0, h).toString('latin1');
      if (!/^HTTP\/1\.1 200 /.test(head)) throw new Error(`answer ${head.split('\r\n')[0]}`);
      const len = /\r\ncontent-length: *(\d+)/i.exec(head);
      if (!len) throw new Error('answer without Content-Length');
      const total = h + 4 + Number(len[1]);
      return b.length >= total ? total : -1;
    },
  };
}

function loop(conn: number): void {
  let seq = 0;
  let buf: Buffer = Buffer.alloc(0);
  let cur: { req: Buffer; parse: Parser; sent: number } | undefined;
  const s = net.connect({ host, port });
  s.setNoDelay(true);
  const next = (): void => {
    if (stopping) return;
    const r = kind === 'memcached' ? memcachedRequest(conn, seq++) : nginxRequest();
    cur = { ...r, sent: wall() };
    s.write(r.req);
  };
  let failed = false;
  const fail = (msg: string): void => {
    if (failed) return;
    failed = true;
    out.push(`E ${wall().toFixed(3)} conn ${conn}: ${msg.replaceAll('\n', ' ')}\n`);
    s.destroy();
    if (!stopping) setTimeout(() => loop(conn), 100);
  };
  s.on('connect', next);
  s.on('data', (d: Buffer) => {
    buf = buf.length ? Buffer.concat([buf, d]) : d;
    while (cur) {
      let n: number;
      try {
        n = cur.parse(buf);
      } catch (e) {
        fail((e as Error).message);
        return;
      }
      if (n < 0) return;
      const t = wall();
      out.push(`${t.toFixed(3)} ${(t - cur.sent).toFixed(3)}\n`);
      buf = buf.subarray(n);
      cur = undefined;
      next();
    }
  });
  s.on('error', (e) => fail(e.message));
  s.on('close', () => fail('connection closed'));
}

for (let i = 0; i < conns; i++) loop(i);
