import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { createLogger } from '../util/log.ts';
import { EXIT_UNEXPECTED, onUnexpected } from './crash.ts';

const HERE = path.dirname(fileURLToPath(import.meta.url));

t.test('an unowned error: one error record with the origin and the stack, then exit 70, once', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const log = createLogger({ host: 'h' }, 'info', (l) => lines.push(JSON.parse(l) as Record<string, unknown>));
  const exits: number[] = [];
  const handle = onUnexpected(log, (c) => exits.push(c));
  handle(new TypeError('boom'), 'uncaughtException');
  handle(new Error('a second one while exiting'), 'unhandledRejection');
  t.same(exits, [EXIT_UNEXPECTED], 'exit once, with 70');
  t.equal(lines.length, 1);
  t.match(lines[0], { level: 'error', host: 'h', origin: 'uncaughtException', exitCode: 70, err: { message: 'boom' } });
  t.match((lines[0]!.err as { stack: string }).stack, /TypeError: boom\n\s+at /, 'the stack says where it came from');
});

t.test('a rejection with a non-Error reason is still named', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const exits: number[] = [];
  onUnexpected(
    createLogger({}, 'info', (l) => lines.push(JSON.parse(l) as Record<string, unknown>)),
    (c) => exits.push(c),
  )('just a string', 'unhandledRejection');
  t.same(exits, [70]);
  t.match(lines[0], { origin: 'unhandledRejection', err: { message: 'just a string' } });
});

// The installed policy in a real process: a throw out of a timer callback and a rejection
// nobody awaits, each ending the process with 70 and one JSON record on stderr.
for (const [what, code] of [
  ['a throw out of a timer', "setTimeout(() => { throw new RangeError('from a handler'); }, 1);"],
  ['a rejection nobody awaits', "void Promise.reject(new RangeError('from a handler'));"],
] as const) {
  t.test(`installCrashPolicy in a real process: ${what}`, async (t) => {
    const script = [
      `const { installCrashPolicy } = await import(${JSON.stringify(path.join(HERE, 'crash.ts'))});`,
      `const { createLogger } = await import(${JSON.stringify(path.join(HERE, '../util/log.ts'))});`,
      "installCrashPolicy(createLogger({ host: 'h' }, 'info'));",
      code,
      // the process would otherwise stay alive on this timer: only the policy can end it early
      'setTimeout(() => process.exit(0), 30_000);',
    ].join('\n');
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8' });
    t.equal(r.status, EXIT_UNEXPECTED, `exit ${r.status}: ${r.stderr}`);
    const records = r.stderr
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    t.equal(records.length, 1, 'one record');
    t.match(records[0], { level: 'error', err: { message: 'from a handler' }, exitCode: 70 });
  });
}
