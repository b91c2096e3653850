import t from 'tap';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { alignedBuffer, directNative, POSIX_FADV_DONTNEED } from './direct-io.ts';
import { FileBlockDevice } from './file-device.ts';
import { BlockJournal } from './journal.ts';
import { LogKind, type Replay } from './journal-log.ts';

const native = directNative();
if (!native) {
  t.fail('native addon with the direct-I/O calls is not built (npm run build:native)');
} else {
  const n = native;

  function image(t: { teardown(fn: () => unknown): void }, content: Buffer): string {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-direct-'));
    t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
    const p = path.join(dir, 'disk.img');
    fs.writeFileSync(p, content);
    return p;
  }

  /** Whether the file system of os.tmpdir() supports O_DIRECT at all. */
  function directSupported(p: string): boolean {
    try {
      fs.closeSync(fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_DIRECT));
      return true;
    } catch {
      return false;
    }
  }

  t.test('alignedBuffer: the address really is aligned, the length exact', async (t) => {
    for (const align of [512, 4096, 65536]) {
      for (const len of [1, 511, 4096, 4097, 100_000, 1 << 20]) {
        const b = alignedBuffer(n, len, align);
        t.equal(b.length, len);
        t.equal(n.addressMod(b, align), 0, `${len} bytes at a multiple of ${align}`);
      }
    }
    // the helper the check relies on does see misalignment
    const raw = Buffer.allocUnsafeSlow(8192);
    const base = n.addressMod(raw, 4096);
    t.equal(n.addressMod(raw.subarray(1), 4096), (base + 1) % 4096, 'addressMod follows the view');
    t.throws(() => n.addressMod(raw, 3000), /power of two/);
  });

  t.test('direct reads: aligned and unaligned ranges, the unaligned end of the file', async (t) => {
    // 1 MiB + 1000 bytes: the last block is partial
    const size = (1 << 20) + 1000;
    const content = randomBytes(size);
    const p = image(t, content);
    if (!directSupported(p)) {
      t.skip(`${os.tmpdir()} refuses O_DIRECT`, () => {});
      return;
    }
    const d = await FileBlockDevice.open(p);
    t.teardown(() => d.close());
    d.bypassCache();
    t.equal(d.readPath, 'direct');
    t.ok(d.directAlign >= 512 && (d.directAlign & (d.directAlign - 1)) === 0, `alignment ${d.directAlign} is a power of two >= 512`);
    t.equal(d.readNow(0, 4096), undefined, 'readNow declines (a direct read waits for the device)');
    const cases: [number, number][] = [
      [0, 4096],
      [4096, 65536],
      [0, 1],
      [1, 1],
      [4095, 2],
      [1000, 5000],
      [8191, 4097],
      [12345, 131071],
      [size - 1000, 1000],
      [size - 1, 1],
      [size - 5000, 5000],
      [0, size],
      [7, 0],
    ];
    for (let i = 0; i < 40; i++) {
      const off = Math.floor(Math.random() * size);
      cases.push([off, Math.floor(Math.random() * Math.min(300_000, size - off + 1))]);
    }
    for (const [off, len] of cases) {
      const got = await d.read(off, len);
      t.equal(got.length, len);
      t.ok(got.equals(content.subarray(off, off + len)), `[${off}, +${len})`);
    }
  });

  t.test('direct reads never fill the page cache; buffered reads do (control)', async (t) => {
    const size = 4 << 20;
    const p = image(t, randomBytes(size));
    if (!directSupported(p)) {
      t.skip(`${os.tmpdir()} refuses O_DIRECT`, () => {});
      return;
    }
    const fd = fs.openSync(p, 'r');
    t.teardown(() => fs.closeSync(fd));
    fs.fdatasyncSync(fd);
    t.equal(n.fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    if (n.residentPages(fd, 0, size) !== 0) {
      t.skip('the file system keeps its pages resident (tmpfs?): nothing to observe', () => {});
      return;
    }
    const d = await FileBlockDevice.open(p);
    t.teardown(() => d.close());
    d.bypassCache();
    await d.read(0, 1 << 20);
    await d.read(1500, 70_000);
    t.equal(n.residentPages(fd, 0, size), 0, 'no page of the image entered the cache');

    const b = await FileBlockDevice.open(p);
    t.teardown(() => b.close());
    await b.read(0, 1 << 20);
    t.ok(n.residentPages(fd, 0, size) >= 256, 'a buffered read of 1 MiB caches its pages (the probe can see them)');
  });

  t.test('a block rewritten through another O_DIRECT descriptor is read anew', async (t) => {
    const size = 1 << 20;
    const p = image(t, Buffer.alloc(size, 0x11));
    if (!directSupported(p)) {
      t.skip(`${os.tmpdir()} refuses O_DIRECT`, () => {});
      return;
    }
    const d = await FileBlockDevice.open(p);
    t.teardown(() => d.close());
    d.bypassCache();
    t.ok((await d.read(8192, 100)).equals(Buffer.alloc(100, 0x11)));
    // "the other host": its own descriptor, O_DIRECT, aligned
    const other = fs.openSync(p, fs.constants.O_RDWR | fs.constants.O_DIRECT);
    t.teardown(() => fs.closeSync(other));
    const w = alignedBuffer(n, 4096, 4096);
    w.fill(0x77);
    t.equal(fs.writeSync(other, w, 0, 4096, 8192), 4096);
    t.ok((await d.read(8192, 100)).equals(Buffer.alloc(100, 0x77)), 'the new content, not the first read');
    t.ok((await d.read(8100, 200)).equals(Buffer.concat([Buffer.alloc(92, 0x11), Buffer.alloc(108, 0x77)])), 'straddling the block');
  });

  t.test('fallback where O_DIRECT is refused: buffered reads after fadvise DONTNEED, warned', async (t) => {
    const content = randomBytes(256 * 1024);
    const p = image(t, content);
    const d = await FileBlockDevice.open(p, { direct: false });
    t.teardown(() => d.close());
    const warned: string[] = [];
    const log = { warn: (m: string) => warned.push(m), info: () => {} } as unknown as Parameters<FileBlockDevice['bypassCache']>[0];
    d.bypassCache(log);
    t.equal(d.readPath, 'dontneed');
    t.match(warned.join('\n'), /refuses O_DIRECT/);
    t.equal(d.readNow(0, 4096), undefined, 'readNow declines');
    t.ok((await d.read(1000, 70_000)).equals(content.subarray(1000, 71_000)), 'reads are exact');
  });

  t.test('the journal reads the image around the cache; its write-back leaves no cached page', async (t) => {
    const size = 1 << 20;
    const content = randomBytes(size);
    const p = image(t, content);
    if (!directSupported(p)) {
      t.skip(`${os.tmpdir()} refuses O_DIRECT`, () => {});
      return;
    }
    const img = await FileBlockDevice.open(p);
    const j = new BlockJournal(img, { maxBytes: 1 << 20 });
    t.teardown(() => j.close());
    t.equal(img.readPath, 'cache', 'pass-through before the window');
    j.journal(1);
    t.equal(img.readPath, 'direct', 'journal mode reads O_DIRECT');
    await j.write(5000, Buffer.alloc(3000, 0xab));
    const want = Buffer.from(content);
    want.fill(0xab, 5000, 8000);
    t.ok((await j.read(4097, 8000)).equals(want.subarray(4097, 12097)), 'unaligned read: image under the overlay');
    await j.seal(1);
    j.passThrough();
    await j.drained();
    const fd = fs.openSync(p, 'r');
    t.teardown(() => fs.closeSync(fd));
    t.ok(fs.readFileSync(p).subarray(5000, 8000).equals(Buffer.alloc(3000, 0xab)), 'written back');
    // readFileSync just cached the file: drop, then look again after another write-back
    n.fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    await j.write(70_000, Buffer.alloc(10_000, 0xcd));
    t.ok((await j.read(69_000, 12_000)).subarray(1000, 11_000).equals(Buffer.alloc(10_000, 0xcd)), 'pass-through write, direct read');
  });

  t.test('a journal rebuilt from its log (sidecar restart) reads around the cache too', async (t) => {
    const content = randomBytes(64 * 1024);
    const p = image(t, content);
    if (!directSupported(p)) {
      t.skip(`${os.tmpdir()} refuses O_DIRECT`, () => {});
      return;
    }
    const img = await FileBlockDevice.open(p);
    const replay = {
      meta: { vm: 'vm1', migrationId: 'm', size: content.length },
      records: [{ kind: LogKind.Write, epoch: 2, offset: 100, length: 3, data: Buffer.from('abc') }],
      validEnd: 0,
      ignoredBytes: 0,
      completed: null,
    } as unknown as Replay;
    const j = BlockJournal.recover(img, replay, { maxBytes: 1 << 20, nextEpoch: 3 });
    t.teardown(() => j.close());
    t.equal(img.readPath, 'direct');
    const want = Buffer.from(content.subarray(0, 4096));
    want.write('abc', 100);
    t.ok((await j.read(0, 4096)).equals(want), 'the replayed write over the image');
  });

  t.test('write-back drops the cached pages it wrote', async (t) => {
    const size = 1 << 20;
    const p = image(t, Buffer.alloc(size));
    if (!directSupported(p)) {
      t.skip(`${os.tmpdir()} refuses O_DIRECT`, () => {});
      return;
    }
    const fd = fs.openSync(p, 'r');
    t.teardown(() => fs.closeSync(fd));
    fs.fdatasyncSync(fd);
    n.fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    if (n.residentPages(fd, 0, size) !== 0) {
      t.skip('the file system keeps its pages resident', () => {});
      return;
    }
    const j = new BlockJournal(await FileBlockDevice.open(p), { maxBytes: 1 << 20 });
    t.teardown(() => j.close());
    j.journal(1);
    await j.write(0, Buffer.alloc(256 * 1024, 0x5a));
    j.passThrough();
    await j.drained();
    t.equal(n.residentPages(fd, 0, size), 0, 'no page of the write-back stays cached');
    t.ok(
      fs
        .readFileSync(p)
        .subarray(0, 256 * 1024)
        .equals(Buffer.alloc(256 * 1024, 0x5a)),
      'and it is in the file',
    );
  });
}
