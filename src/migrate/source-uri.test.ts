/**
 * The source never executes what the destination names: the real daemon and SourceMigration
 * (`migrate` over the control socket) against a peer that holds the key and answers
 * `prepare` with URIs QEMU would act on. S's "QEMU" is a stand-in that speaks QMP and logs
 * every command it gets, so the test sees whether `migrate` (or anything migration-related)
 * ever reached it.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import type { Message } from '../peer/messages.ts';
import type { HostConfig } from '../config/types.ts';
import { callDaemon } from '../control/client.ts';
import { Daemon } from '../daemon/daemon.ts';
import { PeerChannel } from '../peer/channel.ts';
import { ignored, nullLogger } from '../util/log.ts';
import { sleep } from '../util/time.ts';
import { alive } from '../daemon/daemon.test-util.ts';

async function waitUntil(fn: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`waited 30 s in vain for ${what}`);
    await sleep(10);
  }
}

/** A QEMU stand-in: QMP on the socket its command line names; every command logged as "<pid> <command> <args>". */
function fakeQemu(dir: string, log: string): string {
  const file = path.join(dir, 'fake-qemu.cjs');
  fs.writeFileSync(
    file,
    `#!${process.execPath}
const fs = require('fs');
const net = require('net');
const args = process.argv.slice(2);
const qmp = args.map((a) => /^socket,id=qmp0,path=(.*),server=on/.exec(a)).find(Boolean)[1].replace(/,,/g, ',');
const incoming = args.includes('-incoming');
net.createServer((s) => {
  s.on('error', () => {});
  s.write(JSON.stringify({ QMP: { version: { qemu: { micro: 0, minor: 2, major: 7 }, package: '' }, capabilities: [] } }) + '\\r\\n');
  let buf = '';
  s.on('data', (d) => {
    buf += d.toString();
    for (let nl = buf.indexOf('\\n'); nl !== -1; nl = buf.indexOf('\\n')) {
      const cmd = JSON.parse(buf.slice(0, nl));
      buf = buf.slice(nl + 1);
      fs.appendFileSync(${JSON.stringify(log)}, process.pid + ' ' + cmd.execute + ' ' + JSON.stringify(cmd.arguments || {}) + '\\n');
      let ret = {};
      if (cmd.execute === 'query-status') ret = { status: incoming ? 'inmigrate' : 'running', running: !incoming };
      s.write(JSON.stringify({ return: ret, id: cmd.id }) + '\\r\\n');
    }
  });
}).listen(qmp);
setInterval(() => {}, 1e9);
`,
    { mode: 0o755 },
  );
  return file;
}

interface Peer {
  port: number;
  /** What each connection received after the handshake. */
  received: Message[];
  /** The URI `ready` names. */
  uri: string;
}

/** A destination that holds the key and answers every prepare with `ready {uri: peer.uri}`. */
async function evilDestination(t: Test, psk: Buffer): Promise<Peer> {
  const peer: Peer = { port: 0, received: [], uri: '' };
  const srv = net.createServer((sock) => {
    sock.on('error', () => {});
    void PeerChannel.accept(sock, { psk }).then(
      (ch) => {
        ch.on('message', (m) => {
          peer.received.push(m);
          if (m.type === 'control' && m.body.kind === 'prepare') {
            void ch.send({ type: 'control', body: { kind: 'ready', uri: peer.uri } }).catch(ignored(undefined, 'the source closed first'));
          }
        });
        ch.start();
      },
      ignored(undefined, 'a connection that fails its handshake is not a peer this test counts'),
    );
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  peer.port = (srv.address() as net.AddressInfo).port;
  t.teardown(() => new Promise<void>((r) => srv.close(() => r())));
  return peer;
}

t.test('a destination that names anything but tcp:<its address>:<port> gets nothing run', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-uri-'));
  const qmpLog = path.join(dir, 'qmp.log');
  fs.writeFileSync(qmpLog, '');
  const host: HostConfig = {
    name: 'host-s',
    stateDir: path.join(dir, 'state'),
    ramDir: path.join(dir, 'ram'),
    controlSocket: path.join(dir, 'control.sock'),
    vmConfigDir: path.join(dir, 'vms'),
    peer: { listen: { host: '127.0.0.1', port: 0 }, key: randomBytes(32) },
    migration: { listenHost: '127.0.0.1', portRange: [49152, 49152] },
    logLevel: 'error',
  };
  const daemon = new Daemon(host, nullLogger, {});
  await daemon.start();
  const pids = () =>
    new Set(
      fs
        .readFileSync(qmpLog, 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => Number(l.split(' ')[0])),
    );
  t.teardown(async () => {
    await daemon.shutdown();
    for (const pid of pids()) if (alive(pid)) process.kill(pid, 'SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const vmFile = path.join(dir, 'vm1.yaml');
  fs.writeFileSync(vmFile, `name: vm1\nmemoryMiB: 16\nkernel: /nonexistent/vmlinuz\nqemu:\n  binary: ${fakeQemu(dir, qmpLog)}\n`);
  const started = (await callDaemon(host.controlSocket, 'vm.start', { config: vmFile })) as { pid: number; state: string };
  t.equal(started.state, 'running');
  const vmPid = started.pid;
  const vmDir = path.join(host.stateDir, 'vm1');
  const commands = () =>
    fs
      .readFileSync(qmpLog, 'utf8')
      .split('\n')
      .filter((l) => l.startsWith(`${vmPid} `))
      .map((l) => l.split(' ')[1]!);
  const peer = await evilDestination(t, host.peer.key);
  const to = `127.0.0.1:${peer.port}`;
  const pwned = path.join(dir, 'pwned');

  const evil: Array<[string, string]> = [
    [`exec:touch ${pwned}`, 'exec'],
    [`unix:${host.controlSocket}`, 'unix'],
    ['fd:0', 'fd'],
    [`file:${pwned}`, 'file'],
    [`tcp:127.0.0.2:${peer.port}`, 'another host'],
    [`tcp:localhost:${peer.port}`, 'a host name'],
    ['tcp:127.0.0.1:0', 'port 0'],
    [`tcp:127.0.0.1:${peer.port},to=65535`, 'socket options'],
    [`TCP:127.0.0.1:${peer.port}`, 'upper case'],
    ['tcp:127.0.0.1', 'no port'],
  ];
  for (const [uri, what] of evil) {
    peer.uri = uri;
    peer.received.length = 0;
    const before = commands().length;
    // On a build that passes the URI on, QEMU gets `migrate` and the migration never ends here: fail at once.
    const sawMigrate = waitUntil(() => commands().includes('migrate'), 'migrate').then(() => 'migrate-called' as const);
    const outcome = await Promise.race([
      callDaemon(host.controlSocket, 'migrate', { vm: 'vm1', to }).then(
        () => 'resolved' as const,
        (e: unknown) => e as { code?: string },
      ),
      sawMigrate,
    ]);
    t.match(outcome, { code: 'ERR_PEER_MIGRATION_URI' }, `${what}: refused with ERR_PEER_MIGRATION_URI`);
    t.same(commands().slice(before), [], `${what}: no QMP command reached the VM's QEMU`);
    const s = (await callDaemon(host.controlSocket, 'status', { vm: 'vm1' })) as Record<string, unknown>;
    t.match(s, { state: 'running', pid: vmPid, migration: null }, `${what}: the VM runs on, same QEMU, no migration`);
    t.ok(alive(vmPid), `${what}: its QEMU is alive`);
    t.notOk(fs.existsSync(path.join(vmDir, 'migration.json')), `${what}: no migration marker`);
    t.notOk(fs.existsSync(path.join(host.ramDir, 'vm1.ckpt')), `${what}: no checkpoint directory`);
    await waitUntil(() => peer.received.some((m) => m.type === 'abort'), 'the ABORT');
    t.match(
      peer.received.find((m) => m.type === 'abort'),
      { type: 'abort', code: 'ERR_PEER_MIGRATION_URI' },
      `${what}: the destination is told, with the code`,
    );
    await waitUntil(() => [...pids()].every((p) => p === vmPid || !alive(p)), 'the standby gone');
  }
  t.notOk(fs.existsSync(pwned), 'nothing the peer named was executed or opened');
  t.notOk(commands().includes('migrate'), 'QEMU never got migrate');

  // The control: the one accepted form does reach QEMU, as the URI the source rebuilt.
  peer.uri = `tcp:127.0.0.1:${peer.port}`;
  const run = callDaemon(host.controlSocket, 'migrate', { vm: 'vm1', to }).catch((e: unknown) => e);
  await waitUntil(() => commands().includes('migrate'), 'migrate with the valid URI');
  const migrate = fs
    .readFileSync(qmpLog, 'utf8')
    .split('\n')
    .find((l) => l.startsWith(`${vmPid} migrate {`))!;
  t.same(JSON.parse(migrate.slice(`${vmPid} migrate `.length)), { uri: `tcp:127.0.0.1:${peer.port}` }, 'the valid URI reaches QEMU');
  await callDaemon(host.controlSocket, 'abort', { vm: 'vm1' });
  t.match(await run, { outcome: 'rolled-back' });
});
