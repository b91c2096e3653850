import fc from 'fast-check';
import t from 'tap';
import { encodeFrames, FrameDecoder, MAX_FRAME_BYTES } from './codec.ts';

const frames = [Buffer.from('a'), Buffer.alloc(60, 7), Buffer.from([1, 2, 3, 4, 5]), Buffer.alloc(1514, 0xee)];
const wire = encodeFrames(frames);

t.test('wire format: 4-byte big-endian length before every frame', async (t) => {
  t.same([...encodeFrames([Buffer.from([9, 8])])], [0, 0, 0, 2, 9, 8]);
  t.same(new FrameDecoder().push(wire), frames);
});

t.test('split at every byte position, and byte by byte', async (t) => {
  for (let i = 0; i <= wire.length; i++) {
    const d = new FrameDecoder();
    const got = [...d.push(wire.subarray(0, i)), ...d.push(wire.subarray(i))];
    t.same(got, frames, `split at ${i}`);
    t.equal(d.buffered, 0);
  }
  const d = new FrameDecoder();
  const got: Buffer[] = [];
  for (let i = 0; i < wire.length; i++) got.push(...d.push(wire.subarray(i, i + 1)));
  t.same(got, frames);
});

t.test('zero-length frame refused, also when its header is split', async (t) => {
  const bad = Buffer.concat([encodeFrames([Buffer.from('x')]), Buffer.from([0, 0, 0, 0])]);
  for (let i = 0; i <= bad.length; i++) {
    const d = new FrameDecoder();
    t.throws(
      () => {
        d.push(bad.subarray(0, i));
        d.push(bad.subarray(i));
      },
      { code: 'ERR_GATE_FRAME_EMPTY' },
    );
    // the decoder stays dead: framing is lost
    t.throws(() => d.push(encodeFrames([Buffer.from('y')])), { code: 'ERR_GATE_FRAME_EMPTY' });
  }
});

t.test('oversize frame refused before any payload is buffered', async (t) => {
  const hdr = Buffer.alloc(4);
  hdr.writeUInt32BE(MAX_FRAME_BYTES + 1);
  const d = new FrameDecoder();
  t.throws(() => d.push(hdr), { code: 'ERR_GATE_FRAME_TOO_LARGE' });
  hdr.writeUInt32BE(0xffffffff);
  t.throws(() => new FrameDecoder().push(hdr.subarray(0, 3)) && new FrameDecoder().push(hdr), { code: 'ERR_GATE_FRAME_TOO_LARGE' });
  // the largest allowed frame passes
  const big = Buffer.alloc(MAX_FRAME_BYTES, 1);
  t.same(new FrameDecoder().push(encodeFrames([big])), [big]);
  t.throws(() => encodeFrames([Buffer.alloc(MAX_FRAME_BYTES + 1)]), { code: 'ERR_GATE_FRAME_TOO_LARGE' });
  t.throws(() => encodeFrames([Buffer.alloc(0)]), { code: 'ERR_GATE_FRAME_TOO_LARGE' });
});

t.test('property: any frames, any chunking, decode(encode(x)) = x', async (t) => {
  fc.assert(
    fc.property(
      fc.array(fc.uint8Array({ minLength: 1, maxLength: 300 }), { maxLength: 20 }),
      fc.array(fc.nat(400), { maxLength: 30 }),
      (fs, cuts) => {
        const bufs = fs.map((f) => Buffer.from(f));
        const w = encodeFrames(bufs);
        const d = new FrameDecoder();
        const got: Buffer[] = [];
        let pos = 0;
        for (const c of cuts) {
          const end = Math.min(w.length, pos + c);
          got.push(...d.push(w.subarray(pos, end)));
          pos = end;
        }
        got.push(...d.push(w.subarray(pos)));
        t.same(got, bufs);
        return d.buffered === 0;
      },
    ),
  );
});

t.test('property: corrupt bytes never exceed the bound nor crash untyped', async (t) => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 2000 }), (bytes) => {
      const d = new FrameDecoder(1600);
      try {
        for (const f of d.push(Buffer.from(bytes))) if (f.length === 0 || f.length > 1600) return false;
      } catch (e) {
        return ['ERR_GATE_FRAME_EMPTY', 'ERR_GATE_FRAME_TOO_LARGE'].includes((e as { code?: string }).code ?? '');
      }
      return d.buffered <= 1604;
    }),
  );
});
