import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { ProgressTail } from './progress.ts';

t.test('positions from memcheck lines, across two logs, interpolated', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'progress-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const src = path.join(dir, 's.log');
  const dst = path.join(dir, 'd.log');
  const p = new ProgressTail(0);
  p.watch(src);
  p.watch(dst); // absent until written: skipped
  fs.writeFileSync(src, 'memcheck start mb=4 pages=1024 mbps=1\r\nmemcheck progress pass=1 page=256\r\n');
  p.poll(1000);
  fs.appendFileSync(src, 'memcheck progress pass=1 page=512\r\nmemcheck progress pass=1 page=76'); // partial line
  p.poll(2000);
  t.same(p.samples, [
    { t: 1000, pos: 256 },
    { t: 2000, pos: 512 },
  ]);
  fs.appendFileSync(src, '8\r\nmemcheck pass 1 ok\r\n');
  p.poll(3000);
  fs.writeFileSync(dst, 'memcheck progress pass=2 page=256\r\nmemcheck CORRUPT page=1 expected_pass=1 found_pass=0 word=0\r\n');
  p.poll(5000);
  t.same(
    p.samples.map((s) => s.pos),
    [256, 512, 768, 1024, 1280],
  );
  t.equal(p.posAt(999), null, 'before the first sample');
  t.equal(p.posAt(5001), null, 'after the last sample');
  t.equal(p.posAt(1500), 384);
  t.equal(p.posAt(4000), 1152);
  t.equal(p.rate(1000, 2000), 256, 'pages per second');
  t.equal(p.rate(2000, 2000), null, 'empty window');
  t.equal(p.baseline(5000), 128, 'from the end of the first pass (3 s, 1024 pages) to t');
  p.stop();
  t.end();
});

t.test('no start line: nothing is sampled (the page count is unknown)', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'progress-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const f = path.join(dir, 'x.log');
  fs.writeFileSync(f, 'memcheck progress pass=2 page=256\n');
  const p = new ProgressTail(0);
  p.watch(f);
  p.poll(1);
  t.same(p.samples, []);
  t.equal(p.baseline(10), null);
  t.end();
});
