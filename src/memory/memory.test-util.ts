/** Helpers for the memory tests: sparse RAM files on tmpfs. */
import { closeSync, existsSync, fstatSync, mkdtempSync, openSync, rmSync, writeSync, ftruncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isTetherError } from '../errors.ts';
import type { ErrorCode } from '../errors.ts';

export const PAGE = 4096;

export function scratchDir(): string {
  const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  return mkdtempSync(join(base, 'tether-mem-test-'));
}

export interface SparseFile {
  path: string;
  fd: number;
  pages: number;
  /** Writes `data` (a multiple of 4096 bytes) at page `pfn`. */
  write(pfn: number, data: Uint8Array): void;
  /** Allocated bytes (st_blocks * 512). */
  allocated(): number;
  close(): void;
}

/** A file of `pages` pages, all holes, opened read-write. */
export function sparseFile(dir: string, name: string, pages: number): SparseFile {
  const path = join(dir, name);
  const fd = openSync(path, 'w+');
  ftruncateSync(fd, pages * PAGE);
  let open = true;
  return {
    path,
    fd,
    pages,
    write(pfn, data) {
      writeSync(fd, data, 0, data.length, pfn * PAGE);
    },
    allocated() {
      return fstatSync(fd).blocks * 512;
    },
    close() {
      if (open) closeSync(fd);
      open = false;
    },
  };
}

/** A deterministic page whose content depends on `seed`. */
export function page(seed: number): Buffer {
  const b = Buffer.alloc(PAGE);
  let x = (seed * 2654435761 + 1) >>> 0;
  for (let i = 0; i < PAGE; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  return b;
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

/** The assertions the helpers below need (structural, so any tap Test fits). */
export interface Asserts {
  ok(v: unknown, msg: string): unknown;
  fail(msg: string): unknown;
}

function describe(e: unknown): string {
  return `got ${(e as { code?: string }).code}: ${(e as Error).message}`;
}

export function throwsCode(t: Asserts, fn: () => unknown, code: ErrorCode, msg: string): void {
  try {
    fn();
    t.fail(`${msg}: did not throw`);
  } catch (e) {
    t.ok(isTetherError(e, code), `${msg}: ${code} (${describe(e)})`);
  }
}

export async function rejectsCode(t: Asserts, p: Promise<unknown>, code: ErrorCode, msg: string): Promise<void> {
  try {
    await p;
    t.fail(`${msg}: resolved`);
  } catch (e) {
    t.ok(isTetherError(e, code), `${msg}: ${code} (${describe(e)})`);
  }
}
