/**
 * A destination that holds the peer key and lies: run inside a host's namespace in place of
 * its daemon (see migration-uri.test.ts),
 *   node --import tsx netns-tests/evil-peer.ts <host.yaml> <trap.sock> <trapPort>
 * It listens on the host's peer.listen and answers every `prepare` with `ready {uri}`, the
 * uri being the current line read from stdin (the test sets it before each migration). It
 * also sets traps for what a source QEMU would do with such URIs: a unix socket `trap.sock`
 * and a TCP port `trapPort` on the host's address. Stdout, one JSON line per event:
 *   {"ready":true}  {"abort":{code}}  {"trap":"unix"|"tcp"}
 */
import net from 'node:net';
import { loadHostConfig } from '../src/config/load.ts';
import { PeerChannel } from '../src/peer/channel.ts';

const [config, trapSock, trapPort] = process.argv.slice(2);
const host = loadHostConfig(config!);
const say = (m: object) => process.stdout.write(JSON.stringify(m) + '\n');

let uri = '';
let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d: string) => {
  input += d;
  for (let nl = input.indexOf('\n'); nl !== -1; nl = input.indexOf('\n')) {
    uri = input.slice(0, nl);
    input = input.slice(nl + 1);
    say({ uri });
  }
});
process.stdin.on('end', () => process.exit(0));

const listen = (srv: net.Server, opts: net.ListenOptions) => new Promise<void>((r) => srv.listen(opts, r));

const peer = net.createServer((sock) => {
  sock.on('error', () => {});
  PeerChannel.accept(sock, { psk: host.peer.key }).then(
    (ch) => {
      ch.on('message', (m) => {
        if (m.type === 'control' && m.body.kind === 'prepare') {
          // The test reads only this process's stdout: a failed send goes to stderr (its log).
          void ch
            .send({ type: 'control', body: { kind: 'ready', uri } })
            .catch((e: Error) => process.stderr.write(`evil-peer: READY not sent: ${e.message}\n`));
        } else if (m.type === 'abort') say({ abort: { code: m.code } });
      });
      ch.start();
    },
    (e: Error) => process.stderr.write(`evil-peer: a connection failed its handshake: ${e.message}\n`),
  );
});
const trap = (kind: string) =>
  net.createServer((s) => {
    say({ trap: kind });
    s.on('error', () => {});
    s.destroy();
  });
await listen(peer, { host: host.peer.listen.host, port: host.peer.listen.port });
await listen(trap('unix'), { path: trapSock! });
await listen(trap('tcp'), { host: host.peer.listen.host, port: Number(trapPort) });
say({ ready: true });
