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
import { nullLogger } from '../util/log.ts';
import { Daemon } from './daemon.ts';

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

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
