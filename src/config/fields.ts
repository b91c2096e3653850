/**
 * The field reader of the configuration parsers (load.ts): one YAML mapping with a known key
 * set (Obj), typed getters that name the dotted field on error, and the one error they throw
 * (ERR_CONFIG_INVALID, details.field).
 */
import path from 'node:path';
import { TetherError } from '../errors.ts';

/** Longest unix socket path Linux accepts (sun_path is 108 bytes including the NUL). */
export const MAX_UNIX_PATH = 107;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** Whether `s` is a valid VM/host name (also safe as a single path component). */
export function isValidName(s: unknown): s is string {
  return typeof s === 'string' && NAME_RE.test(s);
}

export function invalid(field: string, message: string, details: Record<string, unknown> = {}): never {
  throw new TetherError('ERR_CONFIG_INVALID', `${field === '' ? '(root)' : field}: ${message}`, { ...details, field });
}

export function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'string') return `string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v)}`;
  if (typeof v === 'object') return 'a mapping';
  return `${typeof v} ${String(v)}`;
}

/** One YAML mapping with a known key set; typed getters that name the field on error. */
export class Obj {
  private readonly o: Record<string, unknown>;
  constructor(
    value: unknown,
    private readonly prefix: string,
    allowed: readonly string[],
  ) {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      invalid(prefix, `must be a mapping, got ${describe(value)}`);
    }
    this.o = value as Record<string, unknown>;
    for (const k of Object.keys(this.o)) {
      if (!allowed.includes(k)) invalid(this.f(k), `unknown key (allowed: ${allowed.join(', ')})`);
    }
  }

  private f(key: string): string {
    return this.prefix === '' ? key : `${this.prefix}.${key}`;
  }

  private get(key: string): unknown {
    const v = this.o[key];
    return v === null ? undefined : v; // "key:" with no value means "use the default"
  }

  obj(key: string, allowed: readonly string[]): Obj {
    const v = this.get(key);
    if (v === undefined) invalid(this.f(key), 'is required');
    return new Obj(v, this.f(key), allowed);
  }

  optObj(key: string, allowed: readonly string[]): Obj | undefined {
    const v = this.get(key);
    return v === undefined ? undefined : new Obj(v, this.f(key), allowed);
  }

  optString(key: string, opts: { allowEmpty?: boolean } = {}): string | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    if (typeof v !== 'string') invalid(this.f(key), `must be a string, got ${describe(v)}`);
    if (!opts.allowEmpty && v.trim() === '') invalid(this.f(key), 'must not be empty');
    if (v.includes('\0')) invalid(this.f(key), 'must not contain NUL');
    return v;
  }

  string(key: string): string {
    const v = this.optString(key);
    if (v === undefined) invalid(this.f(key), 'is required');
    return v;
  }

  name(key: string): string {
    const v = this.string(key);
    if (!NAME_RE.test(v)) invalid(this.f(key), 'must be 1-63 characters of A-Z a-z 0-9 _ . - starting with a letter or digit');
    return v;
  }

  optPath(key: string, baseDir: string): string | undefined {
    const v = this.optString(key);
    return v === undefined ? undefined : path.resolve(baseDir, v);
  }

  path(key: string, baseDir: string): string {
    return path.resolve(baseDir, this.string(key));
  }

  optSocketPath(key: string, baseDir: string): string | undefined {
    const p = this.optPath(key, baseDir);
    if (p !== undefined && Buffer.byteLength(p) > MAX_UNIX_PATH) {
      invalid(this.f(key), `resolved path ${p} is longer than ${MAX_UNIX_PATH} bytes (unix socket limit)`);
    }
    return p;
  }

  optBool(key: string): boolean | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    if (typeof v !== 'boolean') invalid(this.f(key), `must be true or false, got ${describe(v)}`);
    return v;
  }

  optInt(key: string, min: number, max: number): number | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      invalid(this.f(key), `must be an integer between ${min} and ${max}, got ${describe(v)}`);
    }
    return v;
  }

  int(key: string, min: number, max: number): number {
    const v = this.optInt(key, min, max);
    if (v === undefined) invalid(this.f(key), `is required (an integer between ${min} and ${max})`);
    return v;
  }

  optEnum<T extends string>(key: string, values: readonly T[]): T | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    if (typeof v !== 'string' || !(values as readonly string[]).includes(v)) {
      invalid(this.f(key), `must be one of ${values.join(', ')}, got ${describe(v)}`);
    }
    return v as T;
  }

  optStringArray(key: string): string[] | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    if (!Array.isArray(v)) invalid(this.f(key), `must be a list of strings, got ${describe(v)}`);
    return v.map((item, i) => {
      if (typeof item !== 'string') invalid(`${this.f(key)}[${i}]`, `must be a string, got ${describe(item)}`);
      return item;
    });
  }

  optList(key: string): unknown[] | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    if (!Array.isArray(v)) invalid(this.f(key), `must be a list, got ${describe(v)}`);
    return v;
  }

  optPortRange(key: string): [number, number] | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    if (!Array.isArray(v) || v.length !== 2) invalid(this.f(key), `must be a list [first, last], got ${describe(v)}`);
    const [lo, hi] = v.map((p, i) => {
      if (typeof p !== 'number' || !Number.isInteger(p) || p < 1 || p > 65535) {
        invalid(`${this.f(key)}[${i}]`, `must be a port between 1 and 65535, got ${describe(p)}`);
      }
      return p;
    }) as [number, number];
    if (lo > hi) invalid(this.f(key), `first port ${lo} is greater than last port ${hi}`);
    return [lo, hi];
  }

  hostPort(key: string): { host: string; port: number } {
    const v = this.optHostPort(key);
    if (v === undefined) invalid(this.f(key), 'is required ("host:port")');
    return v;
  }

  /** "host:port", "[v6addr]:port". */
  optHostPort(key: string): { host: string; port: number } | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    if (typeof v !== 'string') invalid(this.f(key), `must be a "host:port" string, got ${describe(v)}`);
    const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:[\]]+)):(\d{1,5})$/.exec(v);
    if (!m) invalid(this.f(key), `must be "host:port" or "[ipv6]:port", got ${describe(v)}`);
    const host = (m[1] ?? m[2])!;
    const port = Number(m[3]);
    if (port < 1 || port > 65535) invalid(this.f(key), `port must be between 1 and 65535, got ${port}`);
    return { host, port };
  }
}
