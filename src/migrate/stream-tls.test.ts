import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import type { QmpClient } from '../qmp/client.ts';
import { nullLogger } from '../util/log.ts';
import { pskFileLine, STREAM_TLS_DIR, STREAM_TLS_ID, STREAM_TLS_USER, StreamTls, streamPsk } from './stream-tls.ts';

const peerKey = Buffer.alloc(32, 7);
const id1 = '0b6f3a56-6f1e-4a3e-9d51-2f6c1f1d2e01';
const id2 = '0b6f3a56-6f1e-4a3e-9d51-2f6c1f1d2e02';

t.test('the stream key is HKDF of the peer key and the migration id: the same on both sides, new per migration', async (t) => {
  const k = streamPsk(peerKey, id1);
  t.equal(k.length, 32);
  t.same(streamPsk(Buffer.from(peerKey), id1), k, 'both sidecars derive the same key');
  t.not(streamPsk(peerKey, id2).toString('hex'), k.toString('hex'), 'another migration, another key');
  t.not(streamPsk(Buffer.alloc(32, 8), id1).toString('hex'), k.toString('hex'), 'another peer key, another key');
  t.notOk(k.equals(peerKey.subarray(0, 32)), 'not the peer key itself');
  t.equal(pskFileLine(k), `${STREAM_TLS_USER}:${k.toString('hex')}\n`, 'keys.psk: username:hexkey, one line');
});

interface Call {
  cmd: string;
  args: Record<string, unknown> | undefined;
  /** keys.psk as QEMU would find it at that moment. */
  keyFile: { mode: number; dirMode: number; text: string } | null;
}

/** A QMP stand-in recording commands and what the key directory holds when each arrives. */
function fakeQmp(dir: string, fail?: string): { qmp: QmpClient; calls: Call[] } {
  const calls: Call[] = [];
  const qmp = {
    execute: async (cmd: string, args?: Record<string, unknown>) => {
      const f = path.join(dir, STREAM_TLS_DIR, 'keys.psk');
      calls.push({
        cmd,
        args,
        keyFile: fs.existsSync(f)
          ? {
              mode: fs.statSync(f).mode & 0o777,
              dirMode: fs.statSync(path.dirname(f)).mode & 0o777,
              text: fs.readFileSync(f, 'utf8'),
            }
          : null,
      });
      if (cmd === fail) throw new Error(`QEMU refused ${cmd}`);
      return {};
    },
  } as unknown as QmpClient;
  return { qmp, calls };
}

const tmp = (t: { teardown(f: () => void): void }) => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'stream-tls-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
};

t.test('destination (server): key files with their final permissions, object, tls-creds; all gone after tearDown', async (t) => {
  const dir = tmp(t);
  // a directory left by a crashed sidecar, with an old key readable by others
  fs.mkdirSync(path.join(dir, STREAM_TLS_DIR), { mode: 0o755 });
  fs.writeFileSync(path.join(dir, STREAM_TLS_DIR, 'keys.psk'), 'tether:00\n', { mode: 0o644 });
  const psk = streamPsk(peerKey, id1);
  const { qmp, calls } = fakeQmp(dir);
  const tls = await StreamTls.setUp({ qmp, vmDir: dir, endpoint: 'server', psk, log: nullLogger });
  const add = calls.find((c) => c.cmd === 'object-add')!;
  t.same(add.args, { 'qom-type': 'tls-creds-psk', id: STREAM_TLS_ID, endpoint: 'server', dir: path.join(dir, STREAM_TLS_DIR) });
  t.same(add.keyFile, { mode: 0o600, dirMode: 0o700, text: pskFileLine(psk) }, 'QEMU finds this migration key, 0600 in a 0700 dir');
  t.ok(fs.existsSync(path.join(dir, STREAM_TLS_DIR, 'dh-params.pem')), 'fixed DH group: QEMU does not generate one');
  const set = calls.findIndex((c) => c.cmd === 'migrate-set-parameters');
  t.ok(set > calls.indexOf(add), 'tls-creds set after the object exists');
  t.same(calls[set]!.args, { 'tls-creds': STREAM_TLS_ID });
  t.ok(fs.existsSync(path.join(dir, STREAM_TLS_DIR, 'keys.psk')), 'the server keeps its key file until the handshake');
  await tls.removeKeys();
  t.notOk(fs.existsSync(path.join(dir, STREAM_TLS_DIR)));
  calls.length = 0;
  await tls.tearDown();
  t.same(
    calls.map((c) => [c.cmd, c.args]),
    [
      ['migrate-set-parameters', { 'tls-creds': '' }],
      ['object-del', { id: STREAM_TLS_ID }],
    ],
  );
  await tls.tearDown();
  t.equal(calls.length, 2, 'tearDown is idempotent');
});

t.test('source (client): the key file is gone as soon as QEMU loaded it', async (t) => {
  const dir = tmp(t);
  const psk = streamPsk(peerKey, id2);
  const { qmp, calls } = fakeQmp(dir);
  await StreamTls.setUp({ qmp, vmDir: dir, endpoint: 'client', psk, log: nullLogger });
  const add = calls.find((c) => c.cmd === 'object-add')!;
  t.equal(add.args?.username, STREAM_TLS_USER);
  t.equal(add.args?.endpoint, 'client');
  t.equal(add.keyFile?.text, pskFileLine(psk));
  t.notOk(fs.existsSync(path.join(dir, STREAM_TLS_DIR)), 'no key file left on the source');
});

t.test('a refused object-add: ERR_STREAM_TLS, nothing left behind', async (t) => {
  const dir = tmp(t);
  const { qmp, calls } = fakeQmp(dir, 'object-add');
  await t.rejects(StreamTls.setUp({ qmp, vmDir: dir, endpoint: 'server', psk: streamPsk(peerKey, id1), log: nullLogger }), {
    code: 'ERR_STREAM_TLS',
  });
  t.notOk(fs.existsSync(path.join(dir, STREAM_TLS_DIR)), 'key files removed');
  t.ok(
    calls.some((c) => c.cmd === 'migrate-set-parameters' && c.args?.['tls-creds'] === ''),
    'tls-creds unset',
  );
});
