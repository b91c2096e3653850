import t from 'tap';
import { createLogger, ignored, JOURNAL_PRIORITY, stderrIsJournal } from './log.ts';

t.test('stderrIsJournal: only when JOURNAL_STREAM names fd 2 itself', async (t) => {
  const fd2 = () => ({ dev: 25n, ino: 81234n });
  t.ok(stderrIsJournal({ JOURNAL_STREAM: '25:81234' }, fd2));
  t.notOk(stderrIsJournal({}, fd2), 'not under systemd');
  t.notOk(stderrIsJournal({ JOURNAL_STREAM: '25:99' }, fd2), 'inherited, but stderr was redirected (a file, a pipe)');
  t.notOk(stderrIsJournal({ JOURNAL_STREAM: 'garbage' }, fd2));
  t.notOk(
    stderrIsJournal({ JOURNAL_STREAM: '25:81234' }, () => {
      throw new Error('EBADF');
    }),
  );
});

t.test('the sink learns each line level (journald priority prefixes)', async (t) => {
  const got: [string, string][] = [];
  const log = createLogger({ host: 'h' }, 'debug', (line, lv) => got.push([lv, line]));
  log.warn('w');
  log.child({ vm: 'vm1' }).error('e');
  t.same(
    got.map(([lv]) => lv),
    ['warn', 'error'],
  );
  t.match(JSON.parse(got[1]![1]), { level: 'error', host: 'h', vm: 'vm1', msg: 'e' });
  t.same(JOURNAL_PRIORITY, { debug: 7, info: 6, warn: 4, error: 3 });
});

t.test('ignored() logs the failure it lets go, with its reason', async (t) => {
  const lines: string[] = [];
  const log = createLogger({}, 'debug', (l) => lines.push(l));
  await Promise.reject(new Error('gone')).catch(ignored(log, 'channel may be closed'));
  t.equal(lines.length, 1);
  const rec = JSON.parse(lines[0]!);
  t.equal(rec.msg, 'ignored: channel may be closed');
  t.equal(rec.err.message, 'gone');
});
