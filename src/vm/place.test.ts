import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import type { HostConfig, VmConfig } from '../config/types.ts';
import { createLogger } from '../util/log.ts';
import { VmInstance } from './instance.ts';
import { INITIAL_PLACE, PLACE_TRANSITIONS, type VmPlace } from './place.ts';

const host = { stateDir: path.join(os.tmpdir(), 'tether-place'), ramDir: path.join(os.tmpdir(), 'tether-place-ram') } as HostConfig;

function vm(lines: string[] = []): VmInstance {
  const log = createLogger({}, 'info', (line) => lines.push(line));
  return new VmInstance(host, { name: 'vm1', memoryMiB: 16 } as VmConfig, log);
}

/** Walks `vm` through `places` with the property setter, as the daemon and the migrations do. */
function walk(v: VmInstance, places: VmPlace[]): void {
  for (const p of places) v.place = p;
}

t.test('the lifecycles the code runs are allowed, in order', async (t) => {
  const paths: Record<string, VmPlace[]> = {
    'start, migrate away, complete': ['running', 'migrating-out', 'gone'],
    'migrate, refused or unreached': ['running', 'migrating-out', 'running'],
    'migrate, roll back': ['running', 'migrating-out', 'rolling-back', 'running'],
    'migrate, rollback fails': ['running', 'migrating-out', 'rolling-back', 'stopped'],
    'migrate, rollback given up': ['running', 'migrating-out', 'rolling-back', 'gone'],
    'QEMU dies, started again': ['running', 'stopped', 'running'],
    'incoming, completed, stopped': ['migrating-in', 'running', 'stopped'],
    'incoming, fenced': ['migrating-in', 'fenced', 'stopped'],
    'incoming fenced before it started': ['fenced'],
    'restart: adopted': ['recovering', 'running'],
    'restart: completing destination answered': ['recovering', 'migrating-in', 'running'],
    'restart: completing destination rolled back': ['recovering', 'migrating-in', 'fenced'],
    'restart: source had completed': ['recovering', 'gone', 'stopped'],
    'restart: unrecovered, operator adopts': ['recovering', 'unrecovered', 'recovering', 'running'],
    'restart: unrecovered, operator adopts none': ['recovering', 'unrecovered', 'recovering', 'stopped'],
    'restart: adopted, NICs fail': ['recovering', 'running', 'unrecovered'],
  };
  for (const [name, places] of Object.entries(paths)) {
    const v = vm();
    t.equal(v.place, INITIAL_PLACE, `${name}: a new instance is ${INITIAL_PLACE}`);
    t.doesNotThrow(() => walk(v, places), name);
    t.equal(v.place, places.at(-1), `${name}: ends ${places.at(-1)}`);
  }
});

t.test('an illegal move throws ERR_STATE_TRANSITION and leaves the place as it was', async (t) => {
  const cases: [VmPlace[], VmPlace][] = [
    [[], 'gone'], // a VM never started cannot have migrated away
    [[], 'migrating-out'], // only a running VM migrates
    [['running', 'migrating-out', 'gone'], 'running'], // gone for good: a start makes a new instance
    [['migrating-in', 'fenced'], 'running'], // a fenced VM never resumes here
    [['recovering', 'unrecovered'], 'running'], // only through `tether vm adopt` (recovering)
    [['running'], 'rolling-back'], // a rollback is of a migration
  ];
  for (const [before, to] of cases) {
    const v = vm();
    walk(v, before);
    const was = v.place;
    t.throws(
      () => {
        v.place = to;
      },
      { code: 'ERR_STATE_TRANSITION', details: { from: was, to } },
      `${was} -> ${to}`,
    );
    t.equal(v.place, was, `${was} -> ${to} changed nothing`);
  }
});

t.test('same place: a no-op, not logged; a move: logged with from and to', async (t) => {
  const lines: string[] = [];
  const v = vm(lines);
  v.place = 'stopped';
  t.same(lines, [], 'stopped -> stopped logs nothing');
  v.place = 'running';
  v.place = 'running';
  t.equal(lines.length, 1);
  t.match(JSON.parse(lines[0]!), { vm: 'vm1', from: 'stopped', to: 'running' });
});

t.test('the table: unrecovered is reachable from every place, and every place from the initial one', async (t) => {
  const places = Object.keys(PLACE_TRANSITIONS) as VmPlace[];
  for (const p of places) if (p !== 'unrecovered') t.ok(PLACE_TRANSITIONS[p].includes('unrecovered'), `${p} -> unrecovered`);
  const seen = new Set<VmPlace>([INITIAL_PLACE]);
  for (let grew = true; grew;) {
    grew = false;
    for (const p of [...seen]) for (const q of PLACE_TRANSITIONS[p]) if (!seen.has(q)) (seen.add(q), (grew = true));
  }
  t.same([...seen].sort(), [...places].sort());
  for (const p of places) t.notOk(PLACE_TRANSITIONS[p].includes(p), `${p}: x -> x is the setter's no-op, not a listed move`);
});
