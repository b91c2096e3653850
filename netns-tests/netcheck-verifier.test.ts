// Pure unit test of the netcheck conversation verifier (no namespaces, no QEMU).
import t from 'tap';
import { ConversationVerifier, RecordWriter } from '../lab/net/netcheck-verifier.ts';

const N = '0123456789abcdef';

function conversation(): Buffer {
  const w = new RecordWriter();
  return Buffer.concat([
    w.record('H', 0, N, 'feedfacefeedface'),
    w.record('A', 1, N, 'tok'),
    w.record('D', 2, N, '5'),
    Buffer.from('xxxxx'),
    w.record('A', 3, N, 't3'),
  ]);
}

t.test('a consistent conversation verifies, split at every byte', async (t) => {
  const bytes = conversation();
  for (let cut = 0; cut <= bytes.length; cut++) {
    const v = new ConversationVerifier();
    [1, 2, 3].forEach((s) => v.expect(s));
    const out = [...v.push(bytes.subarray(0, cut)), ...v.push(bytes.subarray(cut))];
    const bad = out.filter((o) => 'violation' in o);
    if (bad.length) t.fail(`cut ${cut}: ${JSON.stringify(bad)}`);
    t.equal(v.counter, 4);
  }
});

t.test('a record chained over a history the client did not see is a chain mismatch', async (t) => {
  const a = new RecordWriter();
  const b = new RecordWriter();
  const v = new ConversationVerifier();
  v.expect(1);
  v.expect(2);
  // both writers agree on H and A 1, then B's A 2 follows a different A 1 (other nonce)
  const h = a.record('H', 0, N, 'id');
  b.record('H', 0, N, 'id');
  const a1 = a.record('A', 1, N, 'x');
  b.record('A', 1, 'ffffffffffffffff', 'x');
  const b2 = b.record('A', 2, N, 'y');
  const out = v.push(Buffer.concat([h, a1, b2]));
  t.match(
    out.filter((o) => 'violation' in o),
    [{ violation: { kind: 'chain-mismatch', seq: 2 } }],
  );
});

t.test('a counter that goes back and a garbled line are reported', async (t) => {
  const w = new RecordWriter();
  const v = new ConversationVerifier();
  v.expect(1);
  const h = w.record('H', 0, N, 'id');
  const out = v.push(Buffer.concat([h, h]));
  t.ok(out.some((o) => 'violation' in o && o.violation.kind === 'counter-regression'));
  t.ok(new ConversationVerifier().push(Buffer.from('garbage\n')).some((o) => 'violation' in o && o.violation.kind === 'malformed'));
  t.ok(new ConversationVerifier().push(Buffer.alloc(300, 0x41)).some((o) => 'violation' in o && o.violation.kind === 'malformed'));
});
