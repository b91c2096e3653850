import t from 'tap';
import { Encoder } from './codec.ts';
import { Decoder } from './decoder.ts';
import { TetherError } from '../errors.ts';
import { authMac, directionKeys, Handshake, makeHello, sessionKey, verifyAuth } from './handshake.ts';

const PSK = Buffer.alloc(32, 0x5a);

function code(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (e) {
    if (e instanceof TetherError) return e.code;
    throw e;
  }
  return undefined;
}

t.test('handshake', async (t) => {
  const s = new Handshake({ psk: PSK, role: 'source' });
  const d = new Handshake({ psk: PSK, role: 'destination' });
  const sHello = s.onHello(d.hello);
  const dHello = d.onHello(s.hello);
  const [sAuth, dAuth] = [sHello.auth, dHello.auth];
  const sKeys = s.onAuth(dAuth);
  const dKeys = d.onAuth(sAuth);
  t.ok(sKeys.send.equals(dKeys.receive) && sKeys.receive.equals(dKeys.send));
  t.ok(sHello.receiveKey.equals(sKeys.receive) && dHello.receiveKey.equals(dKeys.receive), 'receive key known at HELLO');
  t.equal(
    code(() => s.onAuth(dAuth)),
    'ERR_PROTO_HANDSHAKE',
    'AUTH twice',
  );

  // Functional helpers agree with the state machine.
  const key = sessionKey(PSK, s.hello.nonce, d.hello.nonce);
  t.ok(verifyAuth(key, 'source', s.hello.nonce, d.hello.nonce, sAuth.mac));
  t.notOk(verifyAuth(key, 'destination', s.hello.nonce, d.hello.nonce, sAuth.mac), 'role-bound (no reflection)');
  t.ok(authMac(key, 'destination', s.hello.nonce, d.hello.nonce).equals(dAuth.mac));

  // A peer without the PSK: its AUTH fails, and it cannot MAC frames.
  const honest = new Handshake({ psk: PSK, role: 'source' });
  const mallory = new Handshake({ psk: Buffer.alloc(32, 0x66), role: 'destination' });
  honest.onHello(mallory.hello);
  const forged = mallory.onHello(honest.hello).auth;
  t.equal(
    code(() => honest.onAuth(forged)),
    'ERR_PROTO_BAD_AUTH',
  );
  const honestKeys = directionKeys(sessionKey(PSK, honest.hello.nonce, mallory.hello.nonce), 'source');
  const malloryKeys = directionKeys(sessionKey(Buffer.alloc(32, 0x66), honest.hello.nonce, mallory.hello.nonce), 'destination');
  const frame = Buffer.concat(new Encoder({ key: malloryKeys.send }).encode({ type: 'ack', epoch: 1 }));
  t.equal(
    code(() => new Decoder({ maxPayload: 64, key: honestKeys.receive }).push(frame)),
    'ERR_PROTO_BAD_MAC',
  );

  t.equal(
    code(() => new Handshake({ psk: PSK, role: 'source' }).onHello(makeHello('source'))),
    'ERR_PROTO_HANDSHAKE',
    'same role',
  );
  t.equal(
    code(() => sessionKey(Buffer.alloc(16), Buffer.alloc(32, 1), Buffer.alloc(32, 2))),
    'ERR_PROTO_WEAK_KEY',
  );
  t.equal(
    code(() => sessionKey(PSK, Buffer.alloc(32, 1), Buffer.alloc(32, 1))),
    'ERR_PROTO_HANDSHAKE',
    'echoed nonce',
  );
});
