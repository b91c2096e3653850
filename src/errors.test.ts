import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { ERRORS, errorCode, isErrorCode, isTetherError, remoteError, TetherError } from './errors.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

function sources(dir: string, exts: RegExp): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory() && e.name !== 'build' && e.name !== 'node_modules') out.push(...sources(p, exts));
    else if (e.isFile() && exts.test(e.name) && !e.name.endsWith('.test.ts')) out.push(p);
  }
  return out;
}

const files = [...sources(path.join(ROOT, 'src'), /\.ts$/), ...sources(path.join(ROOT, 'native', 'src'), /\.[ch]$/)].filter(
  (f) => !f.endsWith(path.join('src', 'errors.ts')),
);
const text = files.map((f) => readFileSync(f, 'utf8')).join('\n');

t.test('every ERR_ literal in production code is in the catalogue', async (t) => {
  // Prefix checks (`startsWith('ERR_MEM_')`) end in an underscore and are not codes.
  const used = new Set([...text.matchAll(/['"](ERR_[A-Z0-9_]*[A-Z0-9])['"]/g)].map((m) => m[1]!));
  t.ok(used.size > 50, `found ${used.size} codes`);
  for (const code of used) t.ok(isErrorCode(code), `${code} is catalogued`);
});

t.test('every catalogued code is raised somewhere', async (t) => {
  for (const code of Object.keys(ERRORS)) t.ok(text.includes(`'${code}'`) || text.includes(`"${code}"`), `${code} is used`);
});

t.test('remote codes are checked against the catalogue', async (t) => {
  const known = remoteError('ERR_PEER_AUTH', 'no');
  t.equal(known.code, 'ERR_PEER_AUTH');
  const unknown = remoteError('ERR_FROM_A_NEWER_PEER', 'hm', { epoch: 3 });
  t.equal(unknown.code, 'ERR_UNKNOWN');
  t.same(unknown.details, { epoch: 3, remoteCode: 'ERR_FROM_A_NEWER_PEER' });
  t.ok(isTetherError(unknown, 'ERR_UNKNOWN'));
  t.notOk(isErrorCode('toString'), 'inherited keys are not codes');
  t.equal(errorCode(new Error('plain')), 'ERR_INTERNAL');
  t.equal(errorCode(new TetherError('ERR_FENCED', 'x')), 'ERR_FENCED');
});
