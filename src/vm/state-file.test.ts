import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { isTetherError } from '../errors.ts';
import { nullLogger } from '../util/log.ts';
import type { HostConfig, VmConfig } from '../config/types.ts';
import { VmInstance } from './instance.ts';
import { decodeStateFile, encodeStateFile } from './state-file.ts';

const ID = '0b7c2f3e-5d1a-4c8e-9f00-1234567890ab';

const record = { role: 'source', qemuPid: 4242, peer: '10.0.0.2:7700', startedAt: '2026-11-27T05:00:00.000Z' };

t.test('a state file round-trips and a human can still read it', async (t) => {
  const buf = encodeStateFile('TETHER-MIGRATION', record);
  t.match(buf.toString('utf8'), /^TETHER-MIGRATION 1 \d+ [0-9a-f]{8}\n\{"role":"source"/);
  t.same(decodeStateFile('TETHER-MIGRATION', buf, 'm'), record);
});

t.test('every corrupted byte, and every truncation, is an error, never a record', async (t) => {
  const buf = encodeStateFile('TETHER-MIGRATION', record);
  for (let i = 0; i < buf.length; i++) {
    for (const flip of [0x01, 0x20, 0x80]) {
      const bad = Buffer.from(buf);
      bad[i]! ^= flip;
      let code = 'none';
      try {
        decodeStateFile('TETHER-MIGRATION', bad, 'm');
      } catch (e) {
        code = isTetherError(e) ? e.code : 'untyped';
      }
      if (code !== 'ERR_STATE_FILE_CORRUPT' && code !== 'ERR_STATE_FILE_VERSION') t.fail(`byte ${i} ^ ${flip}: ${code}`);
    }
  }
  for (let n = 0; n < buf.length; n++) {
    t.throws(() => decodeStateFile('TETHER-MIGRATION', buf.subarray(0, n), 'm'), { code: 'ERR_STATE_FILE_CORRUPT' }, `cut at ${n}`);
  }
  t.throws(() => decodeStateFile('TETHER-MIGRATION', Buffer.concat([buf, Buffer.from(' ')]), 'm'), { code: 'ERR_STATE_FILE_CORRUPT' });
  t.throws(() => decodeStateFile('TETHER-VM', buf, 'm'), { code: 'ERR_STATE_FILE_CORRUPT' }, 'another kind of record');
  const v2 = Buffer.from(buf.toString('latin1').replace('TETHER-MIGRATION 1 ', 'TETHER-MIGRATION 2 '), 'latin1');
  t.throws(() => decodeStateFile('TETHER-MIGRATION', v2, 'm'), { code: 'ERR_STATE_FILE_VERSION' });
  // the old bare-JSON form is not silently accepted
  t.throws(() => decodeStateFile('TETHER-MIGRATION', Buffer.from(JSON.stringify(record)), 'm'), { code: 'ERR_STATE_FILE_CORRUPT' });
});

t.test('VmInstance: a missing marker is "no migration", a damaged one is an error', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-state-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const host = { stateDir: dir, ramDir: path.join(dir, 'ram') } as HostConfig;
  const vm = new VmInstance(host, { name: 'vm1', memoryMiB: 16 } as VmConfig, nullLogger);
  await vm.prepareDirs();
  t.equal(await VmInstance.readPersisted(vm.dir), null, 'no vm.json: no VM');
  t.equal(await VmInstance.readMarker(vm.dir), null, 'no marker: no migration');
  fs.writeFileSync(path.join(dir, 'control.sock'), '');
  t.equal(await VmInstance.readPersisted(path.join(dir, 'control.sock')), null, 'a file in stateDir is no VM (not an error)');
  const marker = { role: 'destination' as const, migrationId: ID, qemuPid: null, peer: 'p', startedAt: 'now' };
  await vm.setMigrationMarker(marker);
  t.same(await VmInstance.readMarker(vm.dir), marker);
  const file = path.join(vm.dir, 'migration.json');
  const good = fs.readFileSync(file);
  t.match(good.toString('latin1'), /^TETHER-MIGRATION 2 /, 'the marker is format 2 (with the migration id)');
  for (let i = 0; i < good.length; i++) {
    const bad = Buffer.from(good);
    bad[i]! ^= 0x04;
    fs.writeFileSync(file, bad);
    await t.rejects(VmInstance.readMarker(vm.dir), { code: /^ERR_STATE_FILE_(CORRUPT|VERSION)$/ }, `byte ${i}`);
  }
  fs.writeFileSync(file, good.subarray(0, good.length - 1));
  await t.rejects(VmInstance.readMarker(vm.dir), { code: 'ERR_STATE_FILE_CORRUPT' }, 'truncated marker');
  fs.writeFileSync(path.join(vm.dir, 'vm.json'), '{"config":{}}');
  await t.rejects(VmInstance.readPersisted(vm.dir), { code: 'ERR_STATE_FILE_CORRUPT' }, 'bare JSON vm.json');
  fs.writeFileSync(path.join(vm.dir, 'vm.json'), encodeStateFile('TETHER-VM', { config: {}, sendConfiguration: 'yes', pid: null }));
  await t.rejects(VmInstance.readPersisted(vm.dir), { code: 'ERR_STATE_FILE_CORRUPT' }, 'well-formed but not a VM record');
});

t.test('VmInstance: a marker without a valid migration id, or of format 1, is refused', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-state-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const host = { stateDir: dir, ramDir: path.join(dir, 'ram') } as HostConfig;
  const vm = new VmInstance(host, { name: 'vm1', memoryMiB: 16 } as VmConfig, nullLogger);
  await vm.prepareDirs();
  const file = path.join(vm.dir, 'migration.json');
  const base = { role: 'source', qemuPid: 1, peer: 'p', startedAt: 'now' };
  for (const migrationId of [undefined, '', ID.toUpperCase(), ID + '0', ID.replace(/-/g, ''), '../../x', 42]) {
    fs.writeFileSync(file, encodeStateFile('TETHER-MIGRATION', { ...base, migrationId }, 2));
    await t.rejects(VmInstance.readMarker(vm.dir), { code: 'ERR_STATE_FILE_CORRUPT' }, `migrationId ${String(migrationId)}`);
  }
  // written by a tether before migration ids: it cannot say which migration an answer is for
  fs.writeFileSync(file, encodeStateFile('TETHER-MIGRATION', base, 1));
  await t.rejects(VmInstance.readMarker(vm.dir), { code: 'ERR_STATE_FILE_VERSION', message: /without migration ids/ });
  // vm.json keeps format 1
  await vm.setMigrationMarker(null);
  fs.writeFileSync(
    path.join(vm.dir, 'vm.json'),
    encodeStateFile('TETHER-VM', { config: { name: 'vm1' }, sendConfiguration: true, pid: null }),
  );
  t.match(await VmInstance.readPersisted(vm.dir), { pid: null });
});
