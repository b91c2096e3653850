/**
 * What the daemon exposes before anyone proved who they are: the control socket (born
 * 0600 in a 0700 directory, never chmod'ed after listen), the metrics listener (bound
 * where the config says, nowhere else) and the peer port (pre-authentication frame limit,
 * cap on unauthenticated connections, handshake timeout, each refusal counted).
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import type { HostConfig } from '../config/types.ts';
import { callDaemon } from '../control/client.ts';
import { FRAME_MAGIC, FRAME_VERSION, HANDSHAKE_MAX_PAYLOAD, HEADER_SIZE } from '../peer/codec.ts';
import { PeerChannel } from '../peer/channel.ts';
import { nullLogger } from '../util/log.ts';
import { Daemon } from './daemon.ts';
import { freePort } from './daemon.test-util.ts';

async function hostConfig(t: Test, extra: Partial<HostConfig> = {}): Promise<{ dir: string; host: HostConfig }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-exposure-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const host: HostConfig = {
    name: 'host-x',
    stateDir: path.join(dir, 'state'),
    ramDir: path.join(dir, 'ram'),
    controlSocket: path.join(dir, 'run', 'tether', 'control.sock'),
    vmConfigDir: path.join(dir, 'vms'),
    peer: { listen: { host: '127.0.0.1', port: await freePort() }, key: randomBytes(32) },
    migration: { listenHost: '127.0.0.1', portRange: [49152, 49152] },
    logLevel: 'error',
    ...extra,
  };
  return { dir, host };
}

async function startDaemon(t: Test, host: HostConfig): Promise<Daemon> {
  const d = new Daemon(host, nullLogger, {});
  await d.start();
  t.teardown(() => d.shutdown());
  return d;
}

t.test('the control socket is 0600 from its first instant, in a 0700 directory, never chmod-ed', async (t) => {
  const { host } = await hostConfig(t);
  // The loosest umask an operator could run with: whatever the socket is born with shows.
  const umask = process.umask(0);
  t.teardown(() => void process.umask(umask));
  const chmods: string[] = [];
  const origChmod = fsp.chmod;
  const origChmodSync = fs.chmodSync;
  fsp.chmod = (async (p: fs.PathLike, m: fs.Mode) => {
    chmods.push(String(p));
    return origChmod(p, m);
  }) as typeof fsp.chmod;
  fs.chmodSync = ((p: fs.PathLike, m: fs.Mode) => {
    chmods.push(String(p));
    origChmodSync(p, m);
  }) as typeof fs.chmodSync;
  // The socket's mode at the 'listening' event: before any code after listen() could run.
  let atListening: number | undefined;
  const origListen = net.Server.prototype.listen;
  net.Server.prototype.listen = function (this: net.Server, ...args: unknown[]) {
    const opts = args[0] as net.ListenOptions | undefined;
    if (opts && typeof opts === 'object' && opts.path === host.controlSocket) {
      this.once('listening', () => (atListening = fs.statSync(host.controlSocket).mode & 0o777));
    }
    return (origListen as (...a: unknown[]) => net.Server).apply(this, args);
  } as typeof net.Server.prototype.listen;
  t.teardown(() => {
    fsp.chmod = origChmod;
    fs.chmodSync = origChmodSync;
    net.Server.prototype.listen = origListen;
  });

  await startDaemon(t, host);
  t.equal(atListening?.toString(8), '600', 'mode 0600 at the listening event');
  t.equal((fs.statSync(host.controlSocket).mode & 0o777).toString(8), '600', 'mode 0600 once the daemon runs');
  t.equal((fs.statSync(path.dirname(host.controlSocket)).mode & 0o777).toString(8), '700', 'its directory 0700');
  t.same(
    chmods.filter((p) => p === host.controlSocket),
    [],
    'no chmod of the socket',
  );
  t.equal(process.umask(0), 0, "the process's umask is restored after listen");
  t.match(await callDaemon(host.controlSocket, 'status', {}), { host: 'host-x' }, 'the owner still talks to it');
});

t.test('/metrics listens on the configured address only, and serves nothing else', async (t) => {
  const port = await freePort();
  const { host } = await hostConfig(t, { metrics: { host: '127.0.0.1', port } });
  await startDaemon(t, host);
  const get = (addr: string, url: string) =>
    new Promise<{ status: number; body: string } | { error: string }>((resolve) => {
      http
        .get({ host: addr, port, path: url }, (res) => {
          let body = '';
          res.on('data', (d: Buffer) => (body += d.toString()));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        })
        .on('error', (e: NodeJS.ErrnoException) => resolve({ error: e.code ?? e.message }));
    });
  const ok = await get('127.0.0.1', '/metrics');
  t.match(ok, { status: 200, body: /^# TYPE tether_migrations_total counter$/m }, 'served on 127.0.0.1');
  // 127.0.0.2 is this host too (all of 127/8 is loopback): a wildcard bind would answer there
  t.same(await get('127.0.0.2', '/metrics'), { error: 'ECONNREFUSED' }, 'not on another address of this host');
  t.match(await get('127.0.0.1', '/'), { status: 404 }, 'nothing but /metrics');
});

// ---- peer port before authentication

function refused(d: Daemon, reason: string): number {
  const m = new RegExp(`^tether_peer_refused_total\\{reason="${reason}"\\} (\\d+)$`, 'm').exec(d.metrics.registry.render());
  return m ? Number(m[1]) : 0;
}

/** A raw TCP connection to the daemon's peer port, with a promise of its close. */
async function rawPeer(host: HostConfig): Promise<{ sock: net.Socket; closed: Promise<void>; isClosed: () => boolean }> {
  const sock = net.createConnection({ host: host.peer.listen.host, port: host.peer.listen.port });
  sock.on('error', () => {});
  let isClosed = false;
  const closed = new Promise<void>((r) =>
    sock.once('close', () => {
      isClosed = true;
      r();
    }),
  );
  await new Promise<void>((r) => sock.once('connect', () => r()));
  return { sock, closed, isClosed: () => isClosed };
}

async function waitUntil(fn: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`waited 30 s in vain for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

t.test('before authentication a frame header announcing more than the handshake is cut off at once', async (t) => {
  // a long handshake timeout: the connection can only end because of what it sent
  const { host } = await hostConfig(t);
  host.peer.handshakeTimeoutMs = 60_000;
  const d = await startDaemon(t, host);
  for (const [type, length] of [
    [0x01, 8 * 1024 * 1024], // HELLO claiming 8 MiB (what the channel takes after authentication)
    [0x01, HANDSHAKE_MAX_PAYLOAD + 1], // one byte more than a HELLO
    [0x02, 0xffffffff], // AUTH claiming 4 GiB
  ] as const) {
    const c = await rawPeer(host);
    const header = Buffer.alloc(HEADER_SIZE);
    FRAME_MAGIC.copy(header, 0);
    header[4] = FRAME_VERSION;
    header[5] = type;
    header.writeUInt32BE(length, 8);
    c.sock.write(header);
    await c.closed;
    t.pass(`type ${type}, ${length} bytes announced: closed by the daemon after the header alone`);
  }
  t.equal(refused(d, 'frame_too_large'), 3, 'each counted as frame_too_large');
  // the whole of an honest handshake fits: a real peer still gets in
  const ch = await PeerChannel.connect(host.peer.listen.host, host.peer.listen.port, { psk: host.peer.key });
  t.notOk(ch.closed, 'an authenticated peer connects');
  ch.close();
});

t.test('peer.maxUnauthenticated + 1 concurrent unauthenticated connections: the last is closed at accept', async (t) => {
  const { host } = await hostConfig(t);
  host.peer.handshakeTimeoutMs = 60_000;
  host.peer.maxUnauthenticated = 2;
  const d = await startDaemon(t, host);
  // accepted in the order they connect (the kernel's accept queue is FIFO)
  const a = await rawPeer(host);
  const b = await rawPeer(host);
  const c = await rawPeer(host);
  t.teardown(() => [a, b, c].forEach((x) => x.sock.destroy()));
  await c.closed;
  t.pass('the third is closed');
  t.equal(refused(d, 'unauthenticated_cap'), 1, 'counted as unauthenticated_cap');
  t.notOk(a.isClosed() || b.isClosed(), 'the first two still wait in their handshake');

  // An authenticated peer does not hold a slot; a freed slot is taken again.
  a.sock.destroy();
  await waitUntil(() => refused(d, 'closed') === 1, 'the daemon saw the first one go');
  const ch = await PeerChannel.connect(host.peer.listen.host, host.peer.listen.port, { psk: host.peer.key });
  t.teardown(() => ch.close());
  t.notOk(ch.closed, 'a peer with the key gets the freed slot and authenticates');
  const e = await rawPeer(host);
  const f = await rawPeer(host);
  t.teardown(() => [e, f].forEach((x) => x.sock.destroy()));
  await f.closed;
  t.equal(refused(d, 'unauthenticated_cap'), 2, 'b and e hold the two slots; f is refused');
  t.notOk(e.isClosed(), 'e waits');
  t.notOk(ch.closed, 'the authenticated channel was not affected');
});

t.test('a silent connection is dropped after peer.handshakeTimeoutMs', async (t) => {
  const { host } = await hostConfig(t);
  host.peer.handshakeTimeoutMs = 150;
  const d = await startDaemon(t, host);
  const c = await rawPeer(host);
  await c.closed;
  t.pass('closed by the daemon');
  t.equal(refused(d, 'handshake_timeout'), 1, 'counted as handshake_timeout');
});

t.test('a wrong key is counted as auth_failed', async (t) => {
  const { host } = await hostConfig(t);
  const d = await startDaemon(t, host);
  await t.rejects(PeerChannel.connect(host.peer.listen.host, host.peer.listen.port, { psk: randomBytes(32) }));
  await waitUntil(() => refused(d, 'auth_failed') === 1, 'auth_failed counted');
  t.pass();
});
