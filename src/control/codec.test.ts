import t from 'tap';
import { LineDecoder, parseRequest } from './codec.ts';

t.test('decodes lines split at every byte', async (t) => {
  const text = '{"id":1,"method":"status","params":{"vm":"a"}}\n{"id":2,"result":true}\n';
  for (let i = 0; i <= text.length; i++) {
    const d = new LineDecoder();
    const got = [...d.push(text.slice(0, i)), ...d.push(text.slice(i))];
    t.same(
      got,
      [
        { id: 1, method: 'status', params: { vm: 'a' } },
        { id: 2, result: true },
      ],
      `split at ${i}`,
    );
  }
});

t.test('rejects malformed and oversized lines with codes', async (t) => {
  t.throws(() => new LineDecoder().push('{nope\n'), { code: 'ERR_CONTROL_MALFORMED' });
  t.throws(() => new LineDecoder(10).push('x'.repeat(11)), { code: 'ERR_CONTROL_LINE_TOO_LONG' });
  t.throws(() => parseRequest({ id: 'x', method: 'a' }), { code: 'ERR_CONTROL_MALFORMED' });
  t.throws(() => parseRequest({ id: 1, method: 'a', params: [] }), { code: 'ERR_CONTROL_MALFORMED' });
  t.same(parseRequest({ id: 3, method: 'a' }), { id: 3, method: 'a', params: {} });
});
