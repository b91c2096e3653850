/**
 * The benches the suite reuses instead of measuring again: the rollback part (`bench migrate
 * --only rollback`) and the micro benches (gate, journal), each run as a child
 * (`npm run bench <name>`) unless the run's folder holds its JSON, which is read back.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from '../../../lab/topology.ts';
import { log, type HashFloor, type Rec } from '../lib.ts';
import { LOG_DIR, opt, OUT_DIR, quick, reportOnly, RUN_DIR } from './plan.ts';

/** What the suite reads beside its own runs: hashing floors, the rollback part, the micro benches. */
export interface Extras {
  floors: HashFloor[];
  rollback: Rec | null;
  gate: Rec | null;
  gateFresh: boolean;
  journal: Rec | null;
  journalFresh: boolean;
}

/** The rollback part (bench migrate --only rollback) and the micro benches, run unless the folder has them. */
export async function reusedBenches(): Promise<Extras> {
  const x: Extras = { floors: [], rollback: null, gate: null, gateFresh: false, journal: null, journalFresh: false };
  const rbFile = path.join(RUN_DIR, 'rollback.json');
  if (opt.parts.has('rollback') && !reportOnly && !fs.existsSync(rbFile)) {
    const args = quick
      ? [
          '--only',
          'rollback',
          '--standby',
          'on',
          '--rollback-repeats',
          '1',
          '--rollback-kinds',
          'abort',
          '--passes',
          '1',
          '--memcheck-mb',
          '32',
          '--guest-mib',
          '256',
          // the smoke's one rollback takes the NIC + disk path of the hot standby
          '--rollback-vm',
          'io',
        ]
      : ['--only', 'rollback', '--rollback-repeats', String(opt.rollbackRepeats), '--passes', '1'];
    const j = await childBench('migrate', args, path.join(OUT_DIR, 'migrate.json'));
    if (j) fs.writeFileSync(rbFile, JSON.stringify(j, null, 1) + '\n');
  }
  if (fs.existsSync(rbFile)) x.rollback = JSON.parse(fs.readFileSync(rbFile, 'utf8')) as Rec;
  for (const [name, args] of [
    ['gate', ['--seconds', '2']],
    ['journal', ['--mib', '64']],
  ] as const) {
    const file = path.join(RUN_DIR, `${name}.json`);
    if (opt.parts.has('micro') && !quick && !reportOnly && !fs.existsSync(file)) {
      const j = await childBench(name, [...args], path.join(OUT_DIR, `${name}.json`));
      if (j) fs.writeFileSync(file, JSON.stringify(j, null, 1) + '\n');
    }
    const fresh = fs.existsSync(file);
    const j = fresh ? (JSON.parse(fs.readFileSync(file, 'utf8')) as Rec) : latestJson(name);
    if (name === 'gate') [x.gate, x.gateFresh] = [j, fresh];
    else [x.journal, x.journalFresh] = [j, fresh];
  }
  return x;
}

/** Runs another bench as a child (`npm run bench <name>`) and reads back its JSON. */
async function childBench(name: string, args: string[], jsonFile: string): Promise<Rec | null> {
  log(`running bench ${name} ${args.join(' ')}`);
  const before = fs.existsSync(jsonFile) ? fs.statSync(jsonFile).mtimeMs : 0;
  const logFile = path.join(LOG_DIR, `bench-${name}.log`);
  const fd = fs.openSync(logFile, 'w');
  const code = await new Promise<number | null>((resolve) => {
    const p = spawn(process.execPath, ['--import', 'tsx', path.join(ROOT, 'tools', 'bench', 'run.ts'), name, ...args], {
      stdio: ['ignore', fd, fd],
      cwd: ROOT,
    });
    p.on('exit', (c) => resolve(c));
    p.on('error', () => resolve(null));
  });
  fs.closeSync(fd);
  if (code !== 0) {
    log(`bench ${name} exited ${code} (log: ${logFile})`);
    return null;
  }
  if (!fs.existsSync(jsonFile) || fs.statSync(jsonFile).mtimeMs === before) return null;
  return JSON.parse(fs.readFileSync(jsonFile, 'utf8')) as Rec;
}

/** A bench's latest JSON if a run left one (not run now). */
function latestJson(name: string): Rec | null {
  try {
    return JSON.parse(fs.readFileSync(path.join(OUT_DIR, `${name}.json`), 'utf8')) as Rec;
  } catch {
    return null;
  }
}
