import t from 'tap';
import fc from 'fast-check';
import * as P from './protocol.ts';
import { NbdSession } from './session.ts';
import type { NbdExport, NbdSessionEvent, NbdSessionOptions } from './session.ts';
import { clientFlags, handle, infoData, option, optGo, parseOptionReplies, parseSimpleReply, request, u32, u64 } from './nbd.test-util.ts';

const SIZE = 1024 * 1024;
const EXP: NbdExport = { name: 'vm1', size: SIZE, canTrim: true };
const TFLAGS = P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES;

function session(exp: Partial<NbdExport> = {}, opts: NbdSessionOptions = {}): NbdSession {
  return new NbdSession({ ...EXP, ...exp }, opts);
}

/** Events as comparable plain data (buffers as hex). */
function plain(evs: NbdSessionEvent[]): unknown[] {
  return evs.map((e) => {
    switch (e.kind) {
      case 'send':
        return { send: e.data.toString('hex') };
      case 'request':
        return { ...e.request, handle: e.request.handle.toString('hex'), data: e.request.data.toString('hex') };
      case 'close':
        return { close: e.soft ? 'soft' : 'hard', code: e.error?.code };
      default:
        return e;
    }
  });
}

function sent(evs: NbdSessionEvent[]): Buffer {
  return Buffer.concat(evs.flatMap((e) => (e.kind === 'send' ? [e.data] : [])));
}

function requests(evs: NbdSessionEvent[]) {
  return evs.flatMap((e) => (e.kind === 'request' ? [e.request] : []));
}

function closeOf(evs: NbdSessionEvent[]): { soft: boolean; code: string | undefined } | undefined {
  const c = evs.find((e) => e.kind === 'close');
  return c && c.kind === 'close' ? { soft: c.soft, code: c.error?.code } : undefined;
}

/** A session already in transmission (GO done). */
function transmitting(exp: Partial<NbdExport> = {}, opts: NbdSessionOptions = {}): NbdSession {
  const s = session(exp, opts);
  const evs = s.push(Buffer.concat([clientFlags(), optGo('vm1')]));
  if (!evs.some((e) => e.kind === 'transmission')) throw new Error('no transmission');
  return s;
}

const W = Buffer.alloc(4096, 0xab);
// A whole conversation exercising every option and command this server implements.
const CONVERSATION = Buffer.concat([
  clientFlags(),
  option(P.OPT_STRUCTURED_REPLY),
  option(P.OPT_LIST),
  option(P.OPT_INFO, infoData('vm1', [P.INFO_BLOCK_SIZE, P.INFO_NAME])),
  optGo('vm1', [P.INFO_BLOCK_SIZE]),
  request({ type: P.CMD_READ, handle: handle(1), offset: 0, length: 4096 }),
  request({ type: P.CMD_WRITE, flags: P.CMD_FLAG_FUA, handle: handle(2), offset: 8192 }, W),
  request({ type: P.CMD_FLUSH, handle: handle(3) }),
  request({ type: P.CMD_TRIM, handle: handle(4), offset: 4096, length: 4096 }),
  request({ type: P.CMD_WRITE_ZEROES, flags: P.CMD_FLAG_NO_HOLE, handle: handle(5), offset: SIZE - 512, length: 512 }),
  request({ type: P.CMD_READ, handle: handle(6), offset: SIZE, length: 0 }),
  request({ type: P.CMD_DISC, handle: handle(7) }),
]);

t.test('greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES', async (t) => {
  t.equal(session().greeting().toString('hex'), '4e42444d41474943' + '49484156454f5054' + '0003');
});

t.test('a whole conversation: every option and command', async (t) => {
  const evs = session().push(CONVERSATION);
  const hs = evs.slice(
    0,
    evs.findIndex((e) => e.kind === 'transmission'),
  );
  const replies = parseOptionReplies(sent(hs));
  t.same(
    replies.map((r) => [r.option, r.type]),
    [
      [P.OPT_STRUCTURED_REPLY, P.REP_ERR_UNSUP],
      [P.OPT_LIST, P.REP_SERVER],
      [P.OPT_LIST, P.REP_ACK],
      [P.OPT_INFO, P.REP_INFO],
      [P.OPT_INFO, P.REP_INFO],
      [P.OPT_INFO, P.REP_INFO],
      [P.OPT_INFO, P.REP_ACK],
      [P.OPT_GO, P.REP_INFO],
      [P.OPT_GO, P.REP_INFO],
      [P.OPT_GO, P.REP_ACK],
    ],
  );
  t.equal(replies[1]!.data.toString('hex'), '00000003' + Buffer.from('vm1').toString('hex'), 'REP_SERVER: 32 length, name');
  // NBD_INFO_EXPORT: 16 type 0, 64 size, 16 transmission flags
  t.equal(replies[3]!.data.toString('hex'), '0000' + '0000000000100000' + TFLAGS.toString(16).padStart(4, '0'));
  // NBD_INFO_BLOCK_SIZE: 16 type 3, min 1, preferred 4096, max 32 MiB
  t.equal(replies[4]!.data.toString('hex'), '0003' + '00000001' + '00001000' + '02000000');
  t.equal(replies[5]!.data.toString('hex'), '0001' + Buffer.from('vm1').toString('hex'), 'NBD_INFO_NAME when asked');
  t.same(
    evs.find((e) => e.kind === 'transmission'),
    { kind: 'transmission', exportName: 'vm1', flags: TFLAGS },
  );

  const reqs = requests(evs);
  t.same(
    reqs.map((r) => [r.command, r.handle.toString('hex'), r.offset, r.length, r.fua, r.noHole, r.data.length]),
    [
      ['read', handle(1).toString('hex'), 0, 4096, false, false, 0],
      ['write', handle(2).toString('hex'), 8192, 4096, true, false, 4096],
      ['flush', handle(3).toString('hex'), 0, 0, false, false, 0],
      ['trim', handle(4).toString('hex'), 4096, 4096, false, false, 0],
      ['write-zeroes', handle(5).toString('hex'), SIZE - 512, 512, false, true, 0],
      ['read', handle(6).toString('hex'), SIZE, 0, false, false, 0],
    ],
  );
  t.ok(reqs[1]!.data.equals(W), 'write payload');
  t.same(evs[evs.length - 1], { kind: 'close', soft: true }, 'DISC: soft close, no reply');
  t.equal(sent(evs.slice(evs.findIndex((e) => e.kind === 'transmission'))).length, 0, 'no error replies');
});

t.test('split at every byte position into two chunks', async (t) => {
  const whole = JSON.stringify(plain(session().push(CONVERSATION)));
  const bad: number[] = [];
  for (let i = 0; i <= CONVERSATION.length; i++) {
    const s = session();
    const got = [...s.push(CONVERSATION.subarray(0, i)), ...s.push(CONVERSATION.subarray(i))];
    if (JSON.stringify(plain(got)) !== whole) bad.push(i);
  }
  t.same(bad, [], `all ${CONVERSATION.length + 1} split points decode identically`);
});

t.test('one byte at a time', async (t) => {
  const s = session();
  const got: NbdSessionEvent[] = [];
  for (let i = 0; i < CONVERSATION.length; i++) got.push(...s.push(CONVERSATION.subarray(i, i + 1)));
  t.same(plain(got), plain(session().push(CONVERSATION)));
});

t.test('arbitrary chunkings decode identically (property)', async (t) => {
  const whole = JSON.stringify(plain(session().push(CONVERSATION)));
  fc.assert(
    fc.property(fc.uniqueArray(fc.integer({ min: 1, max: CONVERSATION.length - 1 }), { maxLength: 20 }), (cuts) => {
      const s = session();
      const at = [0, ...cuts.sort((a, b) => a - b), CONVERSATION.length];
      const got: NbdSessionEvent[] = [];
      for (let i = 0; i + 1 < at.length; i++) got.push(...s.push(CONVERSATION.subarray(at[i], at[i + 1])));
      return JSON.stringify(plain(got)) === whole;
    }),
    { numRuns: 300 },
  );
});

t.test('EXPORT_NAME: 8 size + 2 flags, + 124 zeroes unless C_NO_ZEROES', async (t) => {
  const a = session().push(Buffer.concat([clientFlags(), option(P.OPT_EXPORT_NAME, Buffer.from('vm1'))]));
  t.equal(sent(a).toString('hex'), '0000000000100000' + TFLAGS.toString(16).padStart(4, '0'));
  t.ok(a.some((e) => e.kind === 'transmission'));
  const b = session().push(Buffer.concat([clientFlags(P.FLAG_C_FIXED_NEWSTYLE), option(P.OPT_EXPORT_NAME, Buffer.from(''))]));
  t.equal(sent(b).length, 134, 'default export (empty name), with zero padding');
  t.ok(sent(b).subarray(10).equals(Buffer.alloc(124)));
  const c = session().push(Buffer.concat([clientFlags(), option(P.OPT_EXPORT_NAME, Buffer.from('other'))]));
  t.same(closeOf(c), { soft: false, code: 'ERR_NBD_UNKNOWN_EXPORT' }, 'unknown export cannot be errored: hard close');
  t.equal(sent(c).length, 0);
});

t.test('OPT_GO errors keep the handshake going', async (t) => {
  const s = session();
  const cases: Array<[Buffer, number, string]> = [
    [optGo('nope'), P.REP_ERR_UNKNOWN, 'unknown export'],
    [option(P.OPT_GO, Buffer.alloc(5)), P.REP_ERR_INVALID, 'shorter than 6 bytes'],
    [option(P.OPT_GO, Buffer.concat([u32(100), Buffer.from('vm1'), Buffer.alloc(2)])), P.REP_ERR_INVALID, 'name length too big'],
    [option(P.OPT_GO, Buffer.concat([infoData('vm1', [3]), Buffer.alloc(1)])), P.REP_ERR_INVALID, 'trailing byte'],
    [option(P.OPT_GO, infoData('vm1', [3]).subarray(0, 9)), P.REP_ERR_INVALID, 'info count beyond data'],
    [optGo('v\0m'), P.REP_ERR_INVALID, 'NUL in name'],
    [option(P.OPT_GO, Buffer.concat([u32(2), Buffer.from([0xc3, 0x28]), Buffer.alloc(2)])), P.REP_ERR_INVALID, 'invalid UTF-8'],
    [option(P.OPT_LIST, Buffer.from('x')), P.REP_ERR_INVALID, 'LIST with data'],
    [option(P.OPT_STARTTLS), P.REP_ERR_UNSUP, 'STARTTLS (NOTLS mode)'],
    [option(P.OPT_SET_META_CONTEXT, Buffer.alloc(8)), P.REP_ERR_UNSUP, 'SET_META_CONTEXT'],
    [option(0xdeadbeef, Buffer.alloc(10)), P.REP_ERR_UNSUP, 'unknown option'],
  ];
  let first = true;
  for (const [bytes, type, what] of cases) {
    const evs = s.push(first ? Buffer.concat([clientFlags(), bytes]) : bytes);
    first = false;
    const r = parseOptionReplies(sent(evs));
    t.equal(r.length, 1, what);
    t.equal(r[0]!.type, type, what);
    t.equal(closeOf(evs), undefined, `${what}: connection stays`);
  }
  t.ok(
    s.push(optGo('vm1')).some((e) => e.kind === 'transmission'),
    'a good GO still works',
  );
});

t.test('oversized option data is skipped, never buffered', async (t) => {
  const s = session({}, { maxOptionBytes: 64 });
  const big = option(P.OPT_GO, Buffer.alloc(65));
  const evs = s.push(Buffer.concat([clientFlags(), big.subarray(0, 40)]));
  t.equal(evs.length, 0);
  const r = parseOptionReplies(sent(s.push(big.subarray(40))));
  t.same([r[0]!.option, r[0]!.type], [P.OPT_GO, P.REP_ERR_TOO_BIG]);
  const u = parseOptionReplies(sent(s.push(option(77, Buffer.alloc(1000)))));
  t.same([u[0]!.option, u[0]!.type], [77, P.REP_ERR_UNSUP], 'unknown and oversized: UNSUP');
  const e = s.push(option(P.OPT_EXPORT_NAME, Buffer.alloc(65, 0x61)));
  t.same(closeOf(e), { soft: false, code: 'ERR_NBD_OPTION_TOO_BIG' }, 'EXPORT_NAME cannot be errored');
  // A 4 GiB option announces itself in 16 bytes; the session keeps nothing of its body.
  const s2 = session();
  s2.push(Buffer.concat([clientFlags(), u64(P.IHAVEOPT), u32(P.OPT_GO), u32(0xffffffff)]));
  t.equal(s2.state, 'option-skip');
});

t.test('ABORT: ACK then soft close', async (t) => {
  const evs = session().push(Buffer.concat([clientFlags(), option(P.OPT_ABORT, Buffer.from('ignored'))]));
  t.same(
    parseOptionReplies(sent(evs)).map((r) => r.type),
    [P.REP_ACK],
  );
  t.same(closeOf(evs), { soft: true, code: undefined });
});

t.test('handshake violations drop the connection with a stable code', async (t) => {
  t.same(closeOf(session().push(u32(1 << 2))), { soft: false, code: 'ERR_NBD_CLIENT_FLAGS' }, 'unknown client flag');
  const bad = option(P.OPT_GO, infoData('vm1'));
  bad.writeUInt8(bad[0]! ^ 0xff, 0);
  t.same(closeOf(session().push(Buffer.concat([clientFlags(), bad]))), { soft: false, code: 'ERR_NBD_BAD_MAGIC' });
  const s = session({}, { maxOptions: 3 });
  const many = Buffer.concat([clientFlags(), ...Array.from({ length: 4 }, () => option(P.OPT_STRUCTURED_REPLY))]);
  t.same(closeOf(s.push(many)), { soft: false, code: 'ERR_NBD_TOO_MANY_OPTIONS' });
  t.same(s.push(optGo('vm1')), [], 'nothing after close');
});

t.test('requests the spec lets us refuse get the spec error, by handle', async (t) => {
  const cases: Array<[string, Buffer, number]> = [
    ['read past the end', request({ type: P.CMD_READ, handle: handle(9), offset: SIZE - 1, length: 2 }), P.EINVAL],
    ['read at 2^63', request({ type: P.CMD_READ, handle: handle(9), offset: 1n << 63n, length: 1 }), P.EINVAL],
    ['read at 2^64-1', request({ type: P.CMD_READ, handle: handle(9), offset: (1n << 64n) - 1n, length: 1 }), P.EINVAL],
    ['read start past the end', request({ type: P.CMD_READ, handle: handle(9), offset: SIZE + 1, length: 0 }), P.EINVAL],
    ['write past the end', request({ type: P.CMD_WRITE, handle: handle(9), offset: SIZE - 2 }, Buffer.alloc(4)), P.ENOSPC],
    ['write at 2^53', request({ type: P.CMD_WRITE, handle: handle(9), offset: 2n ** 53n }, Buffer.alloc(4)), P.ENOSPC],
    ['write-zeroes past the end', request({ type: P.CMD_WRITE_ZEROES, handle: handle(9), offset: SIZE, length: 1 }), P.ENOSPC],
    ['trim past the end', request({ type: P.CMD_TRIM, handle: handle(9), offset: 0, length: SIZE + 1 }), P.EINVAL],
    ['read over the payload cap', request({ type: P.CMD_READ, handle: handle(9), length: 32 * 1024 * 1024 + 1 }), P.EINVAL],
    ['write-zeroes over the cap', request({ type: P.CMD_WRITE_ZEROES, handle: handle(9), length: 0xffffffff }), P.EINVAL],
    ['flush with an offset', request({ type: P.CMD_FLUSH, handle: handle(9), offset: 1 }), P.EINVAL],
    ['flush with a length', request({ type: P.CMD_FLUSH, handle: handle(9), length: 1 }), P.EINVAL],
    ['CACHE (not advertised)', request({ type: P.CMD_CACHE, handle: handle(9), length: 512 }), P.EINVAL],
    ['BLOCK_STATUS (no contexts)', request({ type: P.CMD_BLOCK_STATUS, handle: handle(9), length: 512 }), P.EINVAL],
    ['unknown command 99', request({ type: 99, handle: handle(9) }), P.EINVAL],
    ['DF on read (not advertised)', request({ type: P.CMD_READ, flags: P.CMD_FLAG_DF, handle: handle(9), length: 1 }), P.EINVAL],
    ['NO_HOLE on write', request({ type: P.CMD_WRITE, flags: P.CMD_FLAG_NO_HOLE, handle: handle(9) }, Buffer.alloc(1)), P.EINVAL],
    ['FAST_ZERO', request({ type: P.CMD_WRITE_ZEROES, flags: P.CMD_FLAG_FAST_ZERO, handle: handle(9), length: 1 }), P.EINVAL],
    ['unknown flag bit 15', request({ type: P.CMD_READ, flags: 0x8000, handle: handle(9), length: 1 }), P.EINVAL],
  ];
  const next = request({ type: P.CMD_READ, handle: handle(10), offset: 0, length: 512 });
  for (const [what, bytes, error] of cases) {
    const s = transmitting();
    const evs = s.push(Buffer.concat([bytes, next]));
    const replies = evs.filter((e) => e.kind === 'send').map((e) => parseSimpleReply((e as { data: Buffer }).data));
    t.same(
      replies.map((r) => [r.error, r.handle.toString('hex')]),
      [[error, handle(9).toString('hex')]],
      what,
    );
    t.same(
      requests(evs).map((r) => r.handle.toString('hex')),
      [handle(10).toString('hex')],
      `${what}: framing kept, next request decoded`,
    );
  }
});

t.test('TRIM and WRITE_ZEROES are refused when not advertised', async (t) => {
  const s = transmitting({ canTrim: false });
  t.equal(s.transmissionFlags & (P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES), 0);
  const evs = s.push(
    Buffer.concat([
      request({ type: P.CMD_TRIM, handle: handle(1), length: 512 }),
      request({ type: P.CMD_WRITE_ZEROES, handle: handle(2), length: 512 }),
    ]),
  );
  t.same(
    evs.map((e) => (e.kind === 'send' ? parseSimpleReply(e.data).error : e.kind)),
    [P.EINVAL, P.EINVAL],
  );
});

t.test('oversized WRITE: payload skipped, EINVAL, next request intact', async (t) => {
  const s = transmitting({}, { maxPayload: 4096 });
  const payload = Buffer.alloc(4097, 1);
  const bytes = Buffer.concat([
    request({ type: P.CMD_WRITE, handle: handle(1) }, payload),
    request({ type: P.CMD_WRITE, handle: handle(2), offset: 512 }, Buffer.alloc(16, 2)),
  ]);
  const evs: NbdSessionEvent[] = [];
  for (let i = 0; i < bytes.length; i += 1000) evs.push(...s.push(bytes.subarray(i, i + 1000)));
  t.same(
    evs.map((e) => (e.kind === 'send' ? ['reply', parseSimpleReply(e.data).error] : [e.kind])),
    [['reply', P.EINVAL], ['request']],
  );
  t.ok(requests(evs)[0]!.data.equals(Buffer.alloc(16, 2)));
});

t.test('truncated request: nothing emitted until the rest arrives', async (t) => {
  const s = transmitting();
  const r = request({ type: P.CMD_WRITE, handle: handle(3), offset: 0 }, Buffer.alloc(100, 7));
  t.same(s.push(r.subarray(0, 27)), []);
  t.same(s.push(r.subarray(27, 127)), []);
  t.equal(s.state, 'write-data');
  t.equal(requests(s.push(r.subarray(127))).length, 1);
});

t.test('bad request magic: hard close, later bytes ignored', async (t) => {
  const s = transmitting();
  const evs = s.push(request({ type: P.CMD_READ, length: 1 }, Buffer.alloc(0), 0x12560953));
  t.same(closeOf(evs), { soft: false, code: 'ERR_NBD_BAD_MAGIC' });
  t.same(s.push(request({ type: P.CMD_READ, length: 1 })), []);
});

const arbitraryBytes = fc.uint8Array({ minLength: 0, maxLength: 400 }).map((a) => Buffer.from(a));

t.test('hostile transmission bytes: no throw, every request inside the export (property)', async (t) => {
  const small = 64 * 1024;
  // Mix random bytes with well-formed requests carrying random fields, so the property
  // reaches deep into validation rather than stopping at the magic.
  const req = fc
    .record({
      type: fc.integer({ min: 0, max: 9 }),
      flags: fc.integer({ min: 0, max: 0xffff }),
      offset: fc.oneof(fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), fc.bigInt({ min: 0n, max: BigInt(small) + 10n })),
      length: fc.oneof(fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: 8192 })),
    })
    .map((r) =>
      request({ ...r, handle: handle(r.type) }, r.type === P.CMD_WRITE && r.length <= 8192 ? Buffer.alloc(r.length) : Buffer.alloc(0)),
    );
  fc.assert(
    fc.property(fc.array(fc.oneof(req, arbitraryBytes), { maxLength: 8 }), fc.integer({ min: 1, max: 64 }), (parts, step) => {
      const s = transmitting({ size: small }, { maxPayload: 4096 });
      const bytes = Buffer.concat(parts);
      for (let i = 0; i < bytes.length; i += step) {
        for (const e of s.push(bytes.subarray(i, i + step))) {
          if (e.kind === 'request') {
            const r = e.request;
            if (r.offset + r.length > small || r.offset < 0) return false;
            if (r.command !== 'trim' && r.length > 4096) return false;
            if (r.command === 'write' ? r.data.length !== r.length : r.data.length !== 0) return false;
          } else if (e.kind === 'send') {
            const rep = parseSimpleReply(e.data);
            if (e.data.length !== 16 || ![P.EINVAL, P.ENOSPC].includes(rep.error)) return false;
          }
        }
      }
      return true;
    }),
    { numRuns: 500 },
  );
});

t.test('hostile handshake bytes: no throw, nothing but option replies or a close (property)', async (t) => {
  fc.assert(
    fc.property(
      fc.array(fc.oneof(arbitraryBytes, fc.constantFrom(clientFlags(), u64(P.IHAVEOPT), optGo('vm1'))), { maxLength: 8 }),
      (parts) => {
        const s = session({}, { maxOptionBytes: 256 });
        for (const p of parts) s.push(p);
        return true;
      },
    ),
    { numRuns: 500 },
  );
});

t.test('an export or option out of range is refused with ERR_NBD_INVALID_OPTION', async (t) => {
  for (const [what, make] of [
    ['negative size', () => session({ size: -1 })],
    ['size past 2^53', () => session({ size: 2 ** 53 })],
    ['name with NUL', () => session({ name: 'a\0b' })],
    ['name over 4096 bytes', () => session({ name: 'x'.repeat(P.MAX_STRING_BYTES + 1) })],
    ['maxPayload below 4096', () => session({}, { maxPayload: 4095 })],
    ['maxPayload of 2^32', () => session({}, { maxPayload: 2 ** 32 })],
  ] as const) {
    t.throws(make, { code: 'ERR_NBD_INVALID_OPTION' }, what);
  }
  t.doesNotThrow(() => session({ size: 0 }, { maxPayload: 4096 }), 'the bounds themselves are accepted');
});
