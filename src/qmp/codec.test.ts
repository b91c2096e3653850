import t from 'tap';
import fc from 'fast-check';
import { QmpDecoder, classify, encodeCommand, type QmpMessage } from './codec.ts';
import { isTetherError } from '../errors.ts';

// Real QEMU 7.2 output, "\r\n"-terminated as on the wire.
const GREETING =
  '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n';
const RETURN_EMPTY = '{"return": {}, "id": "t1"}\r\n';
const RETURN_STATUS = '{"return": {"status": "running", "singlestep": false, "running": true}, "id": "t2"}\r\n';
const ERROR = '{"id": "t3", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\r\n';
const EVENT_STOP = '{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": "STOP"}\r\n';
const EVENT_MIG =
  '{"timestamp": {"seconds": 1700000001, "microseconds": 5}, "event": "MIGRATION", "data": {"status": "postcopy-active"}}\r\n';
const STREAM = GREETING + RETURN_EMPTY + RETURN_STATUS + ERROR + EVENT_STOP + EVENT_MIG;

const EXPECTED: QmpMessage[] = [
  {
    type: 'greeting',
    version: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'Debian 1:7.2+dfsg-7+deb12u18+b3' },
    capabilities: ['oob'],
  },
  { type: 'return', id: 't1', value: {} },
  { type: 'return', id: 't2', value: { status: 'running', singlestep: false, running: true } },
  { type: 'error', id: 't3', errorClass: 'CommandNotFound', desc: 'The command nope has not been found' },
  { type: 'event', event: 'STOP', data: {}, timestamp: { seconds: 1700000000, microseconds: 123456 } },
  {
    type: 'event',
    event: 'MIGRATION',
    data: { status: 'postcopy-active' },
    timestamp: { seconds: 1700000001, microseconds: 5 },
  },
];

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (e) {
    return isTetherError(e) ? e.code : `not a TetherError: ${String(e)}`;
  }
  return undefined;
}

t.test('decodes a whole stream in one chunk', async (t) => {
  t.same(new QmpDecoder().push(STREAM), EXPECTED);
});

t.test('split at every byte position into two chunks', async (t) => {
  const bytes = Buffer.from(STREAM);
  const bad: number[] = [];
  for (let i = 0; i <= bytes.length; i++) {
    const d = new QmpDecoder();
    const got = [...d.push(bytes.subarray(0, i)), ...d.push(bytes.subarray(i))];
    if (JSON.stringify(got) !== JSON.stringify(EXPECTED) || d.bufferedBytes !== 0) bad.push(i);
  }
  t.same(bad, [], `all ${bytes.length + 1} split points decode identically`);
});

t.test('one byte at a time', async (t) => {
  const bytes = Buffer.from(STREAM);
  const d = new QmpDecoder();
  const got: QmpMessage[] = [];
  for (let i = 0; i < bytes.length; i++) got.push(...d.push(bytes.subarray(i, i + 1)));
  t.same(got, EXPECTED);
});

t.test('multi-byte UTF-8 split inside a character survives', async (t) => {
  const line = '{"return": {"desc": "größe ✓ 🚀"}, "id": 7}\n';
  const bytes = Buffer.from(line);
  const want = JSON.stringify([{ type: 'return', id: 7, value: { desc: 'größe ✓ 🚀' } }]);
  const bad: number[] = [];
  for (let i = 0; i <= bytes.length; i++) {
    const d = new QmpDecoder();
    if (JSON.stringify([...d.push(bytes.subarray(0, i)), ...d.push(bytes.subarray(i))]) !== want) bad.push(i);
  }
  t.same(bad, []);
});

t.test('bare LF terminators and empty lines are accepted', async (t) => {
  const got = new QmpDecoder().push('\r\n\n{"return": 1, "id": "a"}\n\r\n{"return": 2}\n');
  t.same(got, [
    { type: 'return', id: 'a', value: 1 },
    { type: 'return', id: undefined, value: 2 },
  ]);
});

t.test('malformed lines', async (t) => {
  const cases: Record<string, string> = {
    'bad JSON': '{"return": \n',
    'truncated object': '{"event": "STOP"\n',
    array: '[1,2]\n',
    string: '"hello"\n',
    null: 'null\n',
    'unknown shape': '{"foo": 1}\n',
    'error without desc': '{"error": {"class": "GenericError"}}\n',
    'error not object': '{"error": "boom"}\n',
    'event without timestamp': '{"event": "STOP"}\n',
    'event bad timestamp': '{"event": "STOP", "timestamp": {"seconds": -1, "microseconds": 0}}\n',
    'event name not string': '{"event": 5, "timestamp": {"seconds": 1, "microseconds": 0}}\n',
    'event data not object': '{"event": "X", "data": [], "timestamp": {"seconds": 1, "microseconds": 0}}\n',
    'id is object': '{"return": {}, "id": {"a": 1}}\n',
    'greeting without capabilities': '{"QMP": {"version": {}}}\n',
  };
  for (const [name, line] of Object.entries(cases)) {
    t.equal(
      codeOf(() => new QmpDecoder().push(line)),
      'ERR_QMP_MALFORMED',
      name,
    );
  }
});

t.test('an error is sticky: the decoder does not resync', async (t) => {
  const d = new QmpDecoder();
  t.equal(
    codeOf(() => d.push('garbage\n')),
    'ERR_QMP_MALFORMED',
  );
  t.equal(
    codeOf(() => d.push(RETURN_EMPTY)),
    'ERR_QMP_MALFORMED',
  );
});

t.test('oversized line is rejected before it is buffered', async (t) => {
  const d = new QmpDecoder({ maxLineBytes: 64 });
  t.same(d.push('{"return": "' + 'a'.repeat(40)), []);
  t.equal(
    codeOf(() => d.push('b'.repeat(40))),
    'ERR_QMP_LINE_TOO_LONG',
  );
  t.ok(d.bufferedBytes === 0, 'nothing retained after the failure');

  // complete oversized line in one chunk
  const d2 = new QmpDecoder({ maxLineBytes: 64 });
  t.equal(
    codeOf(() => d2.push(`{"return": "${'x'.repeat(100)}"}\n`)),
    'ERR_QMP_LINE_TOO_LONG',
  );

  // oversized completion of a buffered prefix
  const d3 = new QmpDecoder({ maxLineBytes: 64 });
  d3.push('{"return": "');
  t.equal(
    codeOf(() => d3.push(`${'x'.repeat(100)}"}\n`)),
    'ERR_QMP_LINE_TOO_LONG',
  );
});

t.test('a line of exactly maxLineBytes (plus CRLF) is accepted', async (t) => {
  const body = '{"return": "' + 'a'.repeat(64 - 15) + '"}';
  t.equal(Buffer.byteLength(body), 64 - 1);
  const line = body.padEnd(64, ' ');
  const d = new QmpDecoder({ maxLineBytes: 64 });
  // split so that the CR arrives alone, while the line is at the limit
  t.same(d.push(line), []);
  t.same(d.push('\r'), []);
  t.same(d.push('\n'), [{ type: 'return', id: undefined, value: 'a'.repeat(49) }]);
  t.equal(
    codeOf(() => new QmpDecoder({ maxLineBytes: 64 }).push(line + ' \r\n')),
    'ERR_QMP_LINE_TOO_LONG',
  );
});

t.test('encodeCommand emits one line that round-trips', async (t) => {
  const line = encodeCommand('xen-save-devices-state', { filename: '/tmp/a\nb', live: false }, 't9');
  t.equal(line.indexOf('\n'), line.length - 1);
  t.same(JSON.parse(line), { execute: 'xen-save-devices-state', arguments: { filename: '/tmp/a\nb', live: false }, id: 't9' });
  t.same(JSON.parse(encodeCommand('stop', undefined, 3)), { execute: 'stop', id: 3 });
});

t.test('classify tolerates missing event data', async (t) => {
  t.same(classify('{"event":"RESUME","timestamp":{"seconds":1,"microseconds":2}}'), {
    type: 'event',
    event: 'RESUME',
    data: {},
    timestamp: { seconds: 1, microseconds: 2 },
  });
});

t.test('property: any chunking of any valid stream decodes the same', async (t) => {
  const msg = fc.oneof(
    fc.record({ return: fc.jsonValue(), id: fc.string() }),
    fc.record({ error: fc.record({ class: fc.string(), desc: fc.string() }), id: fc.nat() }),
    fc.record({
      event: fc.string({ minLength: 1 }),
      data: fc.dictionary(fc.string(), fc.jsonValue()),
      timestamp: fc.record({ seconds: fc.nat(), microseconds: fc.nat(999999) }),
    }),
  );
  fc.assert(
    fc.property(fc.array(msg, { maxLength: 8 }), fc.array(fc.nat(), { maxLength: 10 }), (msgs, cuts) => {
      const bytes = Buffer.from(msgs.map((m) => `${JSON.stringify(m)}\r\n`).join(''));
      const whole = new QmpDecoder().push(bytes);
      const points = [...new Set(cuts.map((c) => (bytes.length === 0 ? 0 : c % bytes.length)))].sort((a, b) => a - b);
      const d = new QmpDecoder();
      const got: QmpMessage[] = [];
      let prev = 0;
      for (const p of [...points, bytes.length]) {
        got.push(...d.push(bytes.subarray(prev, p)));
        prev = p;
      }
      return whole.length === msgs.length && JSON.stringify(got) === JSON.stringify(whole);
    }),
  );
  t.pass('100 random streams, random chunkings');
});

t.test('property: arbitrary bytes never crash with a non-TetherError', async (t) => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
      const d = new QmpDecoder({ maxLineBytes: 128 });
      try {
        d.push(Buffer.from(bytes));
      } catch (e) {
        return isTetherError(e, 'ERR_QMP_MALFORMED') || isTetherError(e, 'ERR_QMP_LINE_TOO_LONG');
      }
      return true;
    }),
  );
  t.pass();
});
