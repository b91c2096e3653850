import t, { type Test } from 'tap';
import net from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from './client.ts';
import { isTetherError } from '../errors.ts';
import type { ErrorCode } from '../errors.ts';

const GREETING = {
  QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'fake' }, capabilities: ['oob'] },
};

interface Cmd {
  execute: string;
  arguments?: Record<string, unknown>;
  id?: unknown;
}

/** Handler returns the objects to send back (none = stay silent). */
type Handler = (cmd: Cmd, conn: FakeConn) => unknown[] | void;

interface FakeConn {
  send(obj: unknown): void;
  raw(s: string): void;
  end(): void;
  destroy(): void;
}

function event(name: string, data?: Record<string, unknown>): Record<string, unknown> {
  const now = Date.now();
  return {
    event: name,
    ...(data ? { data } : {}),
    timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 },
  };
}

async function fakeQmp(
  t: Test,
  handler: Handler,
  opts: { greeting?: unknown | null; sockPath?: string; listenDelayMs?: number } = {},
): Promise<{ path: string; commands: Cmd[]; conns: FakeConn[] }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-qmp-'));
  const sockPath = opts.sockPath ?? path.join(dir, 'qmp.sock');
  const commands: Cmd[] = [];
  const conns: FakeConn[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    const conn: FakeConn = {
      send: (obj) => s.write(`${JSON.stringify(obj)}\r\n`),
      raw: (str) => s.write(str),
      end: () => s.end(),
      destroy: () => s.destroy(),
    };
    conns.push(conn);
    if (opts.greeting !== null) conn.send(opts.greeting ?? GREETING);
    let buf = '';
    s.on('data', (d) => {
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) !== -1) {
        const cmd = JSON.parse(buf.slice(0, nl)) as Cmd;
        buf = buf.slice(nl + 1);
        commands.push(cmd);
        if (cmd.execute === 'qmp_capabilities') {
          conn.send({ return: {}, id: cmd.id });
          continue;
        }
        for (const out of handler(cmd, conn) ?? []) conn.send(out);
      }
    });
    s.on('error', () => {});
    s.on('close', () => sockets.delete(s));
  });
  const listen = (): void => {
    server.listen(sockPath);
  };
  if (opts.listenDelayMs) setTimeout(listen, opts.listenDelayMs);
  else await new Promise<void>((r) => server.listen(sockPath, r));
  t.teardown(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { path: sockPath, commands, conns };
}

async function rejectsCode(t: Test, p: Promise<unknown>, code: ErrorCode, msg?: string): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    t.ok(isTetherError(e, code), `${msg ?? 'rejects'} with ${code} (got ${isTetherError(e) ? e.code : String(e)})`);
    return e;
  }
  t.fail(`${msg ?? 'promise'} resolved; expected ${code}`);
  return undefined;
}

async function open(t: Test, p: string, opts = {}): Promise<QmpClient> {
  const c = await QmpClient.connect(p, { timeoutMs: 2000, ...opts });
  t.teardown(() => c.close());
  return c;
}

t.test('greeting and capability negotiation', async (t) => {
  const srv = await fakeQmp(t, (cmd) =>
    cmd.execute === 'query-status' ? [{ return: { status: 'running', running: true }, id: cmd.id }] : [],
  );
  const c = await open(t, srv.path);
  t.equal(c.greeting.version.qemu.major, 7);
  t.same(c.greeting.capabilities, ['oob']);
  t.equal(srv.commands[0]?.execute, 'qmp_capabilities', 'negotiation is the first command');
  t.same(await c.execute('query-status'), { status: 'running', running: true });
  t.match(srv.commands[1], { execute: 'query-status' });
  t.notOk('arguments' in srv.commands[1]!, 'no arguments key when none given');
});

t.test('arguments are sent and results correlated by id, even out of order', async (t) => {
  let held: Cmd | undefined;
  const srv = await fakeQmp(t, (cmd, conn) => {
    if (cmd.execute === 'slow') {
      held = cmd;
      return [];
    }
    if (cmd.execute === 'fast') {
      // answer fast first, then the held slow one, with an event in between
      const out = [{ return: { who: 'fast', args: cmd.arguments }, id: cmd.id }, event('STOP'), { return: { who: 'slow' }, id: held!.id }];
      for (const o of out) conn.send(o);
    }
    return [];
  });
  const c = await open(t, srv.path);
  const slow = c.execute('slow');
  const fast = c.execute('fast', { n: 1, s: 'x' });
  t.same(await fast, { who: 'fast', args: { n: 1, s: 'x' } });
  t.same(await slow, { who: 'slow' });
});

t.test('QEMU errors become ERR_QMP_COMMAND with class and desc', async (t) => {
  const srv = await fakeQmp(t, (cmd) => [
    { error: { class: 'CommandNotFound', desc: `The command ${cmd.execute} has not been found` }, id: cmd.id },
  ]);
  const c = await open(t, srv.path);
  const e = await rejectsCode(t, c.execute('nope'), 'ERR_QMP_COMMAND');
  t.match((e as { details: unknown }).details, {
    command: 'nope',
    errorClass: 'CommandNotFound',
    desc: 'The command nope has not been found',
  });
  // the connection is still usable
  await rejectsCode(t, c.execute('nope2'), 'ERR_QMP_COMMAND');
});

t.test('events: listener and waitForEvent with predicate, interleaved with replies', async (t) => {
  const srv = await fakeQmp(t, (cmd) => {
    if (cmd.execute === 'migrate') {
      return [
        event('MIGRATION', { status: 'setup' }),
        event('MIGRATION', { status: 'active' }),
        { return: {}, id: cmd.id },
        event('MIGRATION', { status: 'postcopy-active' }),
      ];
    }
    return [];
  });
  const c = await open(t, srv.path);
  const seen: string[] = [];
  c.on('event', (name, data, ts) => {
    seen.push(`${name}:${String(data['status'])}`);
    t.type(ts.seconds, 'number');
  });
  const post = c.waitForEvent('MIGRATION', (d) => d['status'] === 'postcopy-active', 2000);
  const any = c.waitForEvent('MIGRATION', undefined, 2000);
  await c.execute('migrate', { uri: 'tcp:x' });
  t.equal((await any).data['status'], 'setup');
  t.equal((await post).data['status'], 'postcopy-active');
  t.same(seen, ['MIGRATION:setup', 'MIGRATION:active', 'MIGRATION:postcopy-active']);
});

t.test('waitForEvent times out with ERR_QMP_TIMEOUT', async (t) => {
  const srv = await fakeQmp(t, () => []);
  const c = await open(t, srv.path);
  await rejectsCode(t, c.waitForEvent('RESUME', undefined, 50), 'ERR_QMP_TIMEOUT');
});

t.test('a throwing predicate rejects that waiter only', async (t) => {
  const srv = await fakeQmp(t, (cmd) => [event('X'), { return: {}, id: cmd.id }]);
  const c = await open(t, srv.path);
  const bad = c.waitForEvent(
    'X',
    () => {
      throw new Error('boom');
    },
    1000,
  );
  const good = c.waitForEvent('X', undefined, 1000);
  await c.execute('go');
  await t.rejects(bad, { message: 'boom' });
  t.equal((await good).event, 'X');
});

t.test('command timeout: ERR_QMP_TIMEOUT, late reply is dropped, client keeps working', async (t) => {
  let late: Cmd | undefined;
  const srv = await fakeQmp(t, (cmd, conn) => {
    if (cmd.execute === 'hang') {
      late = cmd;
      return [];
    }
    if (late) conn.send({ return: 'late', id: late.id });
    return [{ return: 'ok', id: cmd.id }];
  });
  const c = await open(t, srv.path);
  const e = await rejectsCode(t, c.execute('hang', undefined, { timeoutMs: 50 }), 'ERR_QMP_TIMEOUT');
  t.match((e as { details: unknown }).details, { command: 'hang', timeoutMs: 50 });
  t.equal(await c.execute('next'), 'ok');
});

t.test('peer closing rejects pending commands and waiters with ERR_QMP_CLOSED', async (t) => {
  const srv = await fakeQmp(t, (cmd, conn) => {
    if (cmd.execute === 'quit') setTimeout(() => conn.end(), 20);
    return [];
  });
  const c = await open(t, srv.path);
  const closed = new Promise<unknown>((r) => c.once('close', r));
  const pending = c.execute('query-status');
  const waiter = c.waitForEvent('SHUTDOWN', undefined, 5000);
  // handled from the start: it rejects in the same instant as `pending`
  const quitting = rejectsCode(t, c.execute('quit'), 'ERR_QMP_CLOSED', 'the quit itself (no reply before the close)');
  await rejectsCode(t, pending, 'ERR_QMP_CLOSED', 'pending command');
  await quitting;
  await rejectsCode(t, waiter, 'ERR_QMP_CLOSED', 'event waiter');
  const reason = await closed;
  t.ok(isTetherError(reason, 'ERR_QMP_CLOSED'), 'close event carries the reason');
  t.ok(c.closed);
  await rejectsCode(t, c.execute('after'), 'ERR_QMP_CLOSED', 'execute after close');
  await rejectsCode(t, c.waitForEvent('X'), 'ERR_QMP_CLOSED', 'waitForEvent after close');
});

t.test('close() rejects pending and is idempotent', async (t) => {
  const srv = await fakeQmp(t, () => []);
  const c = await QmpClient.connect(srv.path, { timeoutMs: 2000 });
  const pending = rejectsCode(t, c.execute('hang'), 'ERR_QMP_CLOSED');
  let reason: unknown = 'unset';
  c.once('close', (r) => (reason = r));
  await c.close();
  await pending;
  t.equal(reason, undefined, 'local close has no failure reason');
  await c.close();
});

t.test('garbage from the server closes the connection', async (t) => {
  const srv = await fakeQmp(t, (cmd, conn) => {
    conn.raw('this is not json\r\n');
    return [];
  });
  const c = await open(t, srv.path);
  const e = await rejectsCode(t, c.execute('x'), 'ERR_QMP_CLOSED');
  t.match((e as { details: unknown }).details, { cause: 'ERR_QMP_MALFORMED' });
});

t.test('oversized line from the server closes the connection', async (t) => {
  const srv = await fakeQmp(t, (cmd) => [{ return: 'y'.repeat(5000), id: cmd.id }]);
  const c = await open(t, srv.path, { maxLineBytes: 1024 });
  const e = await rejectsCode(t, c.execute('x'), 'ERR_QMP_CLOSED');
  t.match((e as { details: unknown }).details, { cause: 'ERR_QMP_LINE_TOO_LONG' });
});

t.test('connect: missing socket fails fast without retry', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-qmp-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  await rejectsCode(t, QmpClient.connect(path.join(dir, 'none.sock')), 'ERR_QMP_CONNECT');
});

t.test('connect: retries until the socket appears', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-qmp-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sockPath = path.join(dir, 'late.sock');
  await fakeQmp(t, () => [], { sockPath, listenDelayMs: 150 });
  const c = await open(t, sockPath, { retryUntilMs: 3000 });
  t.equal(c.greeting.version.qemu.minor, 2);
});

t.test('connect: retry gives up after retryUntilMs, and on abort', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-qmp-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const p = path.join(dir, 'never.sock');
  const t0 = Date.now();
  await rejectsCode(t, QmpClient.connect(p, { retryUntilMs: 100 }), 'ERR_QMP_CONNECT');
  t.ok(Date.now() - t0 >= 90, 'waited for the retry window');
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 50);
  const e = await rejectsCode(t, QmpClient.connect(p, { retryUntilMs: 10_000, signal: ac.signal }), 'ERR_QMP_CONNECT');
  t.match((e as { details: unknown }).details, { aborted: true });
});

t.test('connect: no greeting → ERR_QMP_TIMEOUT', async (t) => {
  const srv = await fakeQmp(t, () => [], { greeting: null });
  await rejectsCode(t, QmpClient.connect(srv.path, { timeoutMs: 100 }), 'ERR_QMP_TIMEOUT');
});

t.test('connect: something other than a greeting → ERR_QMP_MALFORMED', async (t) => {
  const srv = await fakeQmp(t, () => [], { greeting: { return: {} } });
  await rejectsCode(t, QmpClient.connect(srv.path, { timeoutMs: 1000 }), 'ERR_QMP_MALFORMED');
});

t.test('connect: negotiation refused → ERR_QMP_COMMAND', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-qmp-'));
  const sockPath = path.join(dir, 'q.sock');
  const server = net.createServer((s) => {
    s.write(`${JSON.stringify(GREETING)}\r\n`);
    s.on('data', (d) => {
      const cmd = JSON.parse(d.toString()) as Cmd;
      s.write(`${JSON.stringify({ error: { class: 'GenericError', desc: 'nope' }, id: cmd.id })}\r\n`);
    });
    s.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(sockPath, r));
  t.teardown(async () => {
    await new Promise<void>((r) => server.close(() => r()));
    fs.rmSync(dir, { recursive: true, force: true });
  });
  await rejectsCode(t, QmpClient.connect(sockPath, { timeoutMs: 1000 }), 'ERR_QMP_COMMAND');
});

t.test('connect: peer hangs up before greeting → ERR_QMP_CLOSED', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-qmp-'));
  const sockPath = path.join(dir, 'q.sock');
  const server = net.createServer((s) => s.end());
  await new Promise<void>((r) => server.listen(sockPath, r));
  t.teardown(async () => {
    await new Promise<void>((r) => server.close(() => r()));
    fs.rmSync(dir, { recursive: true, force: true });
  });
  await rejectsCode(t, QmpClient.connect(sockPath, { timeoutMs: 1000 }), 'ERR_QMP_CLOSED');
  await sleep(10);
});
