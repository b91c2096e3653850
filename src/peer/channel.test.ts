import net from 'node:net';
import { randomBytes } from 'node:crypto';
import t from 'tap';
import { encode } from './codec.ts';
import type { Message } from './messages.ts';
import { ignored } from '../util/log.ts';
import { PeerChannel } from './channel.ts';

/** A real TCP listener on loopback whose accepted sockets run the destination handshake. */
async function server(psk: Buffer): Promise<{ port: number; accepted: Promise<PeerChannel>; close: () => void }> {
  let resolve!: (c: PeerChannel) => void;
  let reject!: (e: unknown) => void;
  const accepted = new Promise<PeerChannel>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // a test that expects the handshake to fail awaits `accepted` itself; others never look
  accepted.catch(ignored(undefined, 'a refused handshake is asserted by the tests that provoke it'));
  const srv = net.createServer((s) => PeerChannel.accept(s, { psk, handshakeTimeoutMs: 2000 }).then(resolve, reject));
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  return { port: (srv.address() as net.AddressInfo).port, accepted, close: () => srv.close() };
}

const collect = (ch: PeerChannel, n: number): Promise<Message[]> =>
  new Promise((resolve) => {
    const got: Message[] = [];
    ch.on('message', (m) => {
      got.push(m);
      if (got.length === n) resolve(got);
    });
    ch.start();
  });

t.test('both sides authenticate and messages flow both ways in order', async (t) => {
  const psk = randomBytes(32);
  const s = await server(psk);
  t.teardown(s.close);
  const src = await PeerChannel.connect('127.0.0.1', s.port, { psk });
  const dst = await s.accepted;
  t.teardown(() => (src.close(), dst.close()));
  const atDst = collect(dst, 3);
  await src.send({ type: 'begin', epoch: 7 });
  await src.send({ type: 'devstate', epoch: 7, data: Buffer.alloc(100_000, 0xab) });
  await src.send({ type: 'heartbeat', epoch: 7, sentAt: 1.5 });
  const got = await atDst;
  t.same(
    got.map((m) => m.type),
    ['begin', 'devstate', 'heartbeat'],
  );
  t.ok((got[1] as { data: Buffer }).data.equals(Buffer.alloc(100_000, 0xab)), 'payload intact');
  const atSrc = collect(src, 1);
  await dst.send({ type: 'ack', epoch: 7 });
  t.same(await atSrc, [{ type: 'ack', epoch: 7 }]);
});

t.test('a peer with the wrong key is refused during the handshake', async (t) => {
  const s = await server(randomBytes(32));
  t.teardown(s.close);
  await t.rejects(PeerChannel.connect('127.0.0.1', s.port, { psk: randomBytes(32) }), { code: 'ERR_PEER_AUTH' });
  await t.rejects(s.accepted, { code: /^ERR_PEER_(AUTH|HANDSHAKE)$/ });
});

t.test('frames injected without the key after the handshake close the channel', async (t) => {
  const psk = randomBytes(32);
  let raw!: net.Socket;
  const srv = net.createServer((sock) => {
    raw = sock;
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  t.teardown(() => srv.close());
  // The attacker speaks first as "destination" but cannot produce a valid AUTH.
  const connecting = PeerChannel.connect('127.0.0.1', (srv.address() as net.AddressInfo).port, { psk, handshakeTimeoutMs: 1000 });
  await new Promise((r) => setTimeout(r, 100));
  for (const b of encode({ type: 'hello', role: 'destination', nonce: randomBytes(32) })) raw.write(b);
  for (const b of encode({ type: 'auth', mac: randomBytes(32) })) raw.write(b);
  await t.rejects(connecting, { code: 'ERR_PEER_AUTH' });
});

t.test('the channel reports close once when the peer goes away, and refuses to send after', async (t) => {
  const psk = randomBytes(32);
  const s = await server(psk);
  t.teardown(s.close);
  const src = await PeerChannel.connect('127.0.0.1', s.port, { psk });
  const dst = await s.accepted;
  let closes = 0;
  const closed = new Promise<Error | undefined>((r) =>
    src.on('close', (e) => {
      closes++;
      r(e);
    }),
  );
  src.start();
  dst.close();
  t.equal(await closed, undefined, 'a clean close carries no error');
  t.equal(closes, 1);
  await t.rejects(src.send({ type: 'ack', epoch: 1 }), { code: 'ERR_PEER_CLOSED' });
});
