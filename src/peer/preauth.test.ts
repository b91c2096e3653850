/**
 * Before a peer has proven the key, the decoder holds no more than the handshake's own
 * frames: a header announcing more is refused on the header, before any payload is
 * buffered; frames after AUTH are parsed only once the AUTH checked out.
 */
import { randomBytes } from 'node:crypto';
import t from 'tap';
import { Decoder } from './decoder.ts';
import { encodeToBuffer, Encoder, FRAME_MAGIC, FRAME_VERSION, HANDSHAKE_MAX_FRAME, HANDSHAKE_MAX_PAYLOAD, HEADER_SIZE } from './codec.ts';
import { isTetherError } from '../errors.ts';
import { Handshake } from './handshake.ts';

const MAX = 8 * 1024 * 1024;

function header(type: number, length: number): Buffer {
  const h = Buffer.alloc(HEADER_SIZE);
  FRAME_MAGIC.copy(h, 0);
  h[4] = FRAME_VERSION;
  h[5] = type;
  h.writeUInt32BE(length, 8);
  return h;
}

function code(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (e) {
    return isTetherError(e) ? e.code : String(e);
  }
  return undefined;
}

t.test('the limit is the handshake: HELLO (role + nonce) and AUTH (MAC)', async (t) => {
  t.equal(HANDSHAKE_MAX_PAYLOAD, 33);
  t.equal(HANDSHAKE_MAX_FRAME, 49);
  const hs = new Handshake({ psk: randomBytes(32), role: 'source' });
  t.equal(encodeToBuffer(hs.hello).length, HANDSHAKE_MAX_FRAME, 'a HELLO frame is exactly the limit');
  t.ok(encodeToBuffer({ type: 'auth', mac: randomBytes(32) }).length <= HANDSHAKE_MAX_FRAME, 'an AUTH frame fits');
});

t.test('a header announcing more than the handshake is refused on the header, nothing buffered', async (t) => {
  for (const [type, length] of [
    [0x01, HANDSHAKE_MAX_PAYLOAD + 1],
    [0x01, MAX],
    [0x02, MAX - 1],
    [0x02, 0xffffffff],
  ] as const) {
    const d = new Decoder({ maxPayload: MAX, handshake: true });
    t.equal(
      code(() => d.push(header(type, length))),
      'ERR_PROTO_FRAME_TOO_LARGE',
      `type ${type}, ${length} bytes`,
    );
    t.equal(d.bufferedBytes, 0, 'nothing held');
    t.equal(
      code(() => d.push(Buffer.alloc(1024))),
      'ERR_PROTO_POISONED',
      'and nothing more is taken',
    );
  }
  // the control: the same header without handshake mode waits for its payload
  const plain = new Decoder({ maxPayload: MAX, allowUnauthenticated: true });
  t.same(plain.push(header(0x01, MAX)), []);
  t.same(plain.push(Buffer.alloc(64 * 1024)), []);
  t.equal(plain.bufferedBytes, 64 * 1024, 'a decoder outside the handshake buffers what the header announced');
});

t.test('frames after AUTH are parsed only once authenticated(), then with the full limit', async (t) => {
  const psk = randomBytes(32);
  const s = new Handshake({ psk, role: 'source' });
  const dHs = new Handshake({ psk, role: 'destination' });
  // D's decoder, as channel.ts drives it
  const dec = new Decoder({ maxPayload: MAX, handshake: true });
  const [hello] = dec.push(encodeToBuffer(s.hello));
  const { receiveKey, auth: dAuth } = dHs.onHello(hello as never);
  dec.setKey(receiveKey);
  const sAuth = s.onHello(dHs.hello).auth;
  const sKeys = s.onAuth(dAuth);
  // S's AUTH and a large CONTROL frame after it, in one chunk
  const big = { type: 'control' as const, body: { kind: 'x', pad: 'y'.repeat(100_000) } };
  const chunk = Buffer.concat([encodeToBuffer(sAuth), ...new Encoder({ key: sKeys.send }).encode(big)]);
  const first = dec.push(chunk);
  t.same(
    first.map((m) => m.type),
    ['auth'],
    'parsing stops after AUTH: the large frame is not even looked at',
  );
  dHs.onAuth(first[0] as never);
  const rest = dec.authenticated();
  t.same(rest, [big], 'after authentication the frame that followed AUTH is delivered');
});

t.test('a large frame after a bad AUTH is never parsed', async (t) => {
  const psk = randomBytes(32);
  const s = new Handshake({ psk: randomBytes(32), role: 'source' }); // wrong key
  const dHs = new Handshake({ psk, role: 'destination' });
  const dec = new Decoder({ maxPayload: MAX, handshake: true });
  const [hello] = dec.push(encodeToBuffer(s.hello));
  dec.setKey(dHs.onHello(hello as never).receiveKey);
  const auth = s.onHello(dHs.hello).auth;
  const out = dec.push(Buffer.concat([encodeToBuffer(auth), header(0x03, MAX)]));
  t.same(
    out.map((m) => m.type),
    ['auth'],
  );
  t.equal(
    code(() => dHs.onAuth(out[0] as never)),
    'ERR_PROTO_BAD_AUTH',
    'the AUTH fails; the caller drops the connection',
  );
});
