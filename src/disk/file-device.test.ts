import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FileBlockDevice } from './file-device.ts';

async function image(t: { teardown(fn: () => unknown): void }, size: number, fill = 0x11): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-fdev-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const p = path.join(dir, 'disk.img');
  fs.writeFileSync(p, Buffer.alloc(size, fill));
  return p;
}

for (const fallocate of [true, false]) {
  t.test(`read/write/flush/trim/writeZeroes (fallocate ${fallocate ? 'on' : 'off'})`, async (t) => {
    const p = await image(t, 1 << 20);
    const d = await FileBlockDevice.open(p, { fallocate });
    t.teardown(() => d.close());
    t.equal(d.size, 1 << 20);
    await d.write(1000, Buffer.alloc(5000, 0x22), { fua: true });
    t.ok((await d.read(1000, 5000)).equals(Buffer.alloc(5000, 0x22)));
    t.ok(fs.readFileSync(p).subarray(1000, 6000).equals(Buffer.alloc(5000, 0x22)), 'the file holds it');
    await d.flush();
    await d.writeZeroes(8192, 65536, { noHole: true });
    await d.writeZeroes(131072, 4096);
    const f = fs.readFileSync(p);
    t.ok(f.subarray(8192, 8192 + 65536).equals(Buffer.alloc(65536)), 'zeroed (no hole)');
    t.ok(f.subarray(131072, 135168).equals(Buffer.alloc(4096)), 'zeroed (hole allowed)');
    t.equal(f[8191], 0x11, 'byte before untouched');
    t.equal(f[8192 + 65536], 0x11, 'byte after untouched');
    await d.trim(262144, 4096);
    const tr = fs.readFileSync(p).subarray(262144, 266240);
    t.ok(tr.equals(Buffer.alloc(4096)) || tr.equals(Buffer.alloc(4096, 0x11)), 'trim: zeroes or unchanged');
    t.equal(fs.statSync(p).size, 1 << 20, 'size unchanged');
  });
}

t.test('readNow/writeNow (RWF_NOWAIT) agree with read/write, or decline', async (t) => {
  const p = await image(t, 1 << 20);
  const d = await FileBlockDevice.open(p);
  t.teardown(() => d.close());
  await d.read(0, 1 << 20); // now in the page cache
  const got = d.readNow(4096, 8192);
  if (got) t.ok(got.equals(Buffer.alloc(8192, 0x11)), 'cached read served at once');
  else t.comment('kernel without RWF_NOWAIT reads: readNow declined');
  const data = Buffer.alloc(4096, 0x5a);
  if (d.writeNow(8192, data)) t.ok(fs.readFileSync(p).subarray(8192, 12288).equals(data), 'the file holds the fast write');
  else t.comment('file system without RWF_NOWAIT buffered writes: writeNow declined');
  t.throws(() => d.readNow((1 << 20) - 10, 20), { code: 'ERR_DISK_RANGE' }, 'the range check still holds');
  t.equal(d.readNow(0, 1024 * 1024), undefined, 'above NOWAIT_MAX_BYTES: always the thread pool');
  const off = await FileBlockDevice.open(p, { nowait: false });
  t.teardown(() => off.close());
  t.equal(off.readNow(0, 4096), undefined, 'nowait: false never tries');
  t.notOk(off.writeNow(0, data));
});

t.test('every range outside the image is refused before any I/O', async (t) => {
  const p = await image(t, 4096);
  const d = await FileBlockDevice.open(p);
  t.teardown(() => d.close());
  await t.rejects(d.write(4090, Buffer.alloc(7)), { code: 'ERR_DISK_RANGE' });
  await t.rejects(d.read(-1, 1), { code: 'ERR_DISK_RANGE' });
  await t.rejects(d.writeZeroes(0, 4097), { code: 'ERR_DISK_RANGE' });
  await t.rejects(d.trim(2 ** 60, 1), { code: 'ERR_DISK_RANGE' });
  t.equal(fs.statSync(p).size, 4096);
  t.ok(fs.readFileSync(p).equals(Buffer.alloc(4096, 0x11)));
});

t.test('open errors are typed; read-only refuses writes with EROFS', async (t) => {
  await t.rejects(FileBlockDevice.open('/nonexistent/x.img'), { code: 'ERR_DISK_OPEN' });
  const p = await image(t, 4096);
  const d = await FileBlockDevice.open(p, { readOnly: true });
  t.teardown(() => d.close());
  await t.rejects(d.write(0, Buffer.alloc(1)), { code: 'ERR_DISK_IO', details: { errno: 'EROFS' } });
  await d.close();
  await t.rejects(d.read(0, 1), { code: 'ERR_DISK_CLOSED' });
});
