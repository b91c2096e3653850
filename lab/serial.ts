/**
 * Parsers of the guest programs' serial-log lines (tools/guest/: memcheck, diskcheck,
 * diskbench, fsload) and waits on them. The guest's own verdict on its memory and disk is
 * what tests assert and benchmarks report.
 */
import fs from 'node:fs';
import { waitFor } from './proc.ts';

export interface MemcheckReport {
  /** Pass numbers reported ok, in log order. */
  passes: number[];
  /** Lines reporting corruption. */
  corrupt: string[];
  started: number;
}

/** Parse memcheck's lines from a serial log (from byte `from` on). */
export function memcheck(serialLog: string, from = 0): MemcheckReport {
  let text = '';
  try {
    text = fs.readFileSync(serialLog).subarray(from).toString('latin1');
  } catch {
    /* not there yet */
  }
  const passes: number[] = [];
  const corrupt: string[] = [];
  let started = 0;
  for (const line of text.split(/\r?\n/)) {
    const ok = /memcheck pass (\d+) ok/.exec(line);
    if (ok) passes.push(Number(ok[1]));
    if (/CORRUPT/.test(line)) corrupt.push(line);
    if (/memcheck start/.test(line)) started++;
  }
  return { passes, corrupt, started };
}

/** Wait for `count` more completed memcheck passes in the log after byte `from`. */
export async function waitPasses(serialLog: string, from: number, count: number, what: string): Promise<MemcheckReport> {
  let rep = memcheck(serialLog, from);
  await waitFor(() => {
    rep = memcheck(serialLog, from);
    return rep.passes.length >= count || rep.corrupt.length > 0;
  }, `${count} memcheck passes ${what} (${serialLog})`);
  return rep;
}

export interface DiskcheckReport {
  /** Pass numbers reported ok, in log order. */
  passes: number[];
  /** MISMATCH lines and diskcheck's own error lines. */
  mismatch: string[];
}

/** Parse diskcheck's lines from a serial log (from byte `from` on). */
export function diskcheck(serialLog: string, from = 0): DiskcheckReport {
  let text = '';
  try {
    text = fs.readFileSync(serialLog).subarray(from).toString('latin1');
  } catch {
    /* not there yet */
  }
  const passes: number[] = [];
  const mismatch: string[] = [];
  for (const line of text.split(/\r?\n/)) {
    const ok = /diskcheck pass (\d+) ok/.exec(line);
    if (ok) passes.push(Number(ok[1]));
    if (/MISMATCH|diskcheck: /.test(line)) mismatch.push(line);
  }
  return { passes, mismatch };
}

export interface DiskbenchCase {
  case: string;
  qd: number;
  ops: number;
  us: number;
  iops: number;
  latMeanUs: number;
  latP50Us: number;
  latP99Us: number;
}

/** diskbench's result lines from a serial log; `done` once it finished, `error` on its error line. */
export function diskbench(serialLog: string): { cases: DiskbenchCase[]; done: boolean; error?: string } {
  let text = '';
  try {
    text = fs.readFileSync(serialLog, 'utf8');
  } catch {
    /* not created yet */
  }
  const cases: DiskbenchCase[] = [];
  let error: string | undefined;
  for (const line of text.split('\n')) {
    const m = /diskbench case=(\S+) qd=(\d+) ops=(\d+) us=(\d+) iops=(\d+) lat_mean_us=(\d+) lat_p50_us=(\d+) lat_p99_us=(\d+)/.exec(line);
    if (m) {
      const n = m.slice(2).map(Number) as [number, number, number, number, number, number, number];
      cases.push({ case: m[1]!, qd: n[0], ops: n[1], us: n[2], iops: n[3], latMeanUs: n[4], latP50Us: n[5], latP99Us: n[6] });
    }
    if (/diskbench: /.test(line)) error ??= line.trim();
  }
  return { cases, done: /diskbench done/.test(text), ...(error ? { error } : {}) };
}

/** What diskbench's trigger block begins with (TRIGGER_MAGIC in tools/guest/diskbench.c). */
export const DISKBENCH_TRIGGER = 'tether-diskbench-go';

/**
 * Start a diskbench that waits for its trigger (disk.benchTrigger): write the magic into
 * the image's last 4 KiB block, which the guest polls with O_DIRECT reads. The block lies
 * outside the benchmark's span and nobody else writes it.
 */
export function triggerDiskbench(image: string): void {
  const size = fs.statSync(image).size;
  const fd = fs.openSync(image, 'r+');
  try {
    fs.writeSync(fd, Buffer.from(DISKBENCH_TRIGGER), 0, DISKBENCH_TRIGGER.length, size - 4096);
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Wait for `count` more diskcheck passes after byte `from` (or a mismatch). */
export async function waitDiskPasses(serialLog: string, from: number, count: number, what: string): Promise<DiskcheckReport> {
  let rep = diskcheck(serialLog, from);
  await waitFor(() => {
    rep = diskcheck(serialLog, from);
    return rep.passes.length >= count || rep.mismatch.length > 0;
  }, `${count} diskcheck passes ${what} (${serialLog})`);
  return rep;
}

/** Wait for `count` more completed fsload rounds after byte `from`. */
export async function waitFsRounds(serialLog: string, from: number, count: number, what: string): Promise<void> {
  await waitFor(() => {
    let text = '';
    try {
      text = fs.readFileSync(serialLog).subarray(from).toString('latin1');
    } catch {
      /* not there yet */
    }
    if (/fsload: /.test(text)) throw new Error(`fsload failed ${what}: ${text.slice(-500)}`);
    return (text.match(/fsload round \d+ ok/g) ?? []).length >= count;
  }, `${count} fsload rounds ${what} (${serialLog})`);
}
