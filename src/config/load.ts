/**
 * YAML → validated HostConfig / VmConfig.
 *
 * Strict: unknown keys are errors (a typo must not silently fall back to a default).
 * Every error is ERR_CONFIG_INVALID with `details.field` = dotted path ("checkpoint.intervalMs")
 * and a message "<field>: <what is wrong>". Relative paths are resolved against `baseDir`
 * (the YAML file's directory when loading a file).
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { TetherError } from '../errors.ts';
import type { DirtyTrackerKind, DiskConfig, HostConfig, NicConfig, VmConfig } from './types.ts';
import { DEFAULT_CHECKPOINT_WINDOW, MAX_CHECKPOINT_WINDOW } from '../epoch/limits.ts';
import { gateDefaults, gateMinimum, gateReserve } from '../gate/reserve.ts';

export interface ParseOptions {
  /** Directory relative paths are resolved against. */
  baseDir: string;
  /**
   * The send buffer of QEMU's end of the relay's out socket on this host, part of the
   * gate's minimum (default: net.core.wmem_default, see qemuSendBuffer in src/gate/reserve.ts).
   */
  qemuSendBuffer?: number;
}

/** Longest unix socket path Linux accepts (sun_path is 108 bytes including the NUL). */
const MAX_UNIX_PATH = 107;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** Whether `s` is a valid VM/host name (also safe as a single path component). */
export function isValidName(s: unknown): s is string {
  return typeof s === 'string' && NAME_RE.test(s);
}
const LOG_LEVELS = ['debug', 'info', 'warn', 'error'] as const;
const DIRTY_TRACKERS: readonly DirtyTrackerKind[] = ['auto', 'scan', 'soft-dirty'];
const ACCELS = ['tcg', 'kvm'] as const;
const MIN_KEY_BYTES = 32;
/**
 * Peer port defaults: an honest peer's handshake is one round trip and two HMACs; a
 * connection that has not authenticated by then only holds a slot. 16 slots leave room
 * for a few sources migrating in at once and their retried answers (notify.ts).
 */
export const PEER_DEFAULTS = { handshakeTimeoutMs: 3000, maxUnauthenticated: 16 } as const;
/** Linux interface names: IFNAMSIZ 16 including the NUL; no '/', ':' or whitespace. */
const IFNAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$/;
const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
const MAX_NICS = 8;
const MIN_JOURNAL_BYTES = 32 * 1024 * 1024;
const MAX_JOURNAL_BYTES = 1024 ** 4;
const DEFAULT_JOURNAL_BYTES = 256 * 1024 * 1024;

// ---------------------------------------------------------------- file entry points

export function loadHostConfig(file: string): HostConfig {
  return withFile(file, (obj, baseDir) => parseHostConfig(obj, { baseDir }));
}

export function loadVmConfig(file: string): VmConfig {
  return withFile(file, (obj, baseDir) => parseVmConfig(obj, { baseDir }));
}

function withFile<T>(file: string, parse: (obj: unknown, baseDir: string) => T): T {
  const abs = path.resolve(file);
  let text: string;
  try {
    text = fs.readFileSync(abs, 'utf8');
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new TetherError('ERR_CONFIG_READ', `cannot read config ${abs}: ${err.message}`, { file: abs, errno: err.code });
  }
  const doc = YAML.parseDocument(text, { prettyErrors: true, uniqueKeys: true });
  const yamlError = doc.errors[0];
  if (yamlError !== undefined) {
    const pos = yamlError.linePos?.[0];
    throw new TetherError('ERR_CONFIG_YAML', `${abs}: ${yamlError.message}`, {
      file: abs,
      ...(pos ? { line: pos.line, col: pos.col } : {}),
    });
  }
  try {
    return parse(doc.toJS(), path.dirname(abs));
  } catch (e) {
    if (e instanceof TetherError && e.code.startsWith('ERR_CONFIG_')) {
      throw new TetherError(e.code, `${abs}: ${e.message}`, { ...e.details, file: abs });
    }
    throw e;
  }
}

// ---------------------------------------------------------------- host

export function parseHostConfig(obj: unknown, opts: ParseOptions): HostConfig {
  const root = new Obj(obj, '', [
    'name',
    'stateDir',
    'ramDir',
    'controlSocket',
    'vmConfigDir',
    'peer',
    'migration',
    'metrics',
    'logLevel',
    'systemd',
    'journalDir',
  ]);
  const name = root.name('name');
  const stateDir = root.path('stateDir', opts.baseDir);
  const ramDir = root.optPath('ramDir', opts.baseDir) ?? path.join('/dev/shm/tether', name);
  const controlSocket = root.optSocketPath('controlSocket', opts.baseDir) ?? path.join(stateDir, 'control.sock');
  if (Buffer.byteLength(controlSocket) > MAX_UNIX_PATH) {
    invalid('controlSocket', `default ${controlSocket} is longer than ${MAX_UNIX_PATH} bytes; set controlSocket`);
  }

  const vmConfigDir = root.optPath('vmConfigDir', opts.baseDir) ?? '/etc/tether/vms';
  // The destination journal's write-ahead logs (docs/journal.md): host-local storage.
  const journalDir = root.optPath('journalDir', opts.baseDir) ?? path.join(stateDir, 'journal');

  const peerObj = root.obj('peer', ['listen', 'key', 'keyFile', 'handshakeTimeoutMs', 'maxUnauthenticated']);
  const listen = peerObj.hostPort('listen');
  const key = readPeerKey(peerObj, opts.baseDir);
  const handshakeTimeoutMs = peerObj.optInt('handshakeTimeoutMs', 100, 60_000) ?? PEER_DEFAULTS.handshakeTimeoutMs;
  const maxUnauthenticated = peerObj.optInt('maxUnauthenticated', 1, 1024) ?? PEER_DEFAULTS.maxUnauthenticated;

  const migObj = root.optObj('migration', ['listenHost', 'portRange']);
  let listenHost = migObj?.optString('listenHost');
  if (listenHost === undefined) {
    if (isWildcard(listen.host)) {
      invalid('migration.listenHost', `required when peer.listen is a wildcard address (${listen.host})`);
    }
    listenHost = listen.host;
  }
  const portRange = migObj?.optPortRange('portRange') ?? [49152, 49215];

  const metrics = root.optHostPort('metrics');
  const logLevel = root.optEnum('logLevel', LOG_LEVELS) ?? 'info';
  const systemd = parseSystemd(root.optObj('systemd', ['scope', 'slice']));

  return {
    name,
    stateDir,
    ramDir,
    controlSocket,
    vmConfigDir,
    journalDir,
    peer: { listen, key, handshakeTimeoutMs, maxUnauthenticated },
    migration: { listenHost, portRange },
    ...(metrics ? { metrics } : {}),
    logLevel,
    ...(systemd ? { systemd } : {}),
  };
}

const SCOPE_MODES = ['auto', 'always', 'never'] as const;
/** systemd unit names: [A-Za-z0-9:_.\\-], a slice ends in .slice. */
const SLICE_RE = /^[A-Za-z0-9:_.\\-]{1,200}\.slice$/;

function parseSystemd(o: Obj | undefined): HostConfig['systemd'] {
  if (o === undefined) return undefined;
  const scope = o.optEnum('scope', SCOPE_MODES) ?? 'auto';
  const slice = o.optString('slice') ?? 'machine.slice';
  if (!SLICE_RE.test(slice)) invalid('systemd.slice', `must be a slice unit name such as machine.slice, got ${describe(slice)}`);
  return { scope, slice };
}

function isWildcard(host: string): boolean {
  return host === '0.0.0.0' || host === '::' || host === '*';
}

/**
 * Exactly one of peer.key (base64 text) or peer.keyFile. A key file holds either base64 text
 * (anything that is entirely base64 alphabet and decodes to >= 32 bytes is taken as such) or
 * >= 32 raw bytes.
 */
function readPeerKey(peer: Obj, baseDir: string): Buffer {
  const inline = peer.optString('key');
  const file = peer.optPath('keyFile', baseDir);
  if ((inline === undefined) === (file === undefined)) {
    invalid('peer', 'exactly one of peer.key or peer.keyFile must be set');
  }
  if (inline !== undefined) {
    const key = decodeBase64(inline);
    if (key === undefined) invalid('peer.key', 'must be base64');
    if (key.length < MIN_KEY_BYTES) invalid('peer.key', `must decode to at least ${MIN_KEY_BYTES} bytes (got ${key.length})`);
    return key;
  }
  let raw: Buffer;
  let fd: number | undefined;
  try {
    fd = fs.openSync(file!, 'r');
    // Like ssh with a private key: a key others can read is no secret. Checked on the open
    // file, so the mode and the bytes are of the same file.
    const st = fs.fstatSync(fd);
    const mode = st.mode & 0o777;
    if ((mode & 0o077) !== 0) {
      throw new TetherError(
        'ERR_CONFIG_KEY_MODE',
        `peer.keyFile: ${file} has mode ${mode.toString(8).padStart(4, '0')}: group or others may read or write it; chmod 600 it`,
        { field: 'peer.keyFile', file, mode: `0${mode.toString(8)}` },
      );
    }
    const euid = process.geteuid?.();
    if (euid !== undefined && st.uid !== euid && st.uid !== 0) {
      throw new TetherError('ERR_CONFIG_KEY_MODE', `peer.keyFile: ${file} is owned by uid ${st.uid}, not by this user or root`, {
        field: 'peer.keyFile',
        file,
        uid: st.uid,
      });
    }
    raw = fs.readFileSync(fd);
  } catch (e) {
    if (e instanceof TetherError) throw e;
    const err = e as NodeJS.ErrnoException;
    throw new TetherError('ERR_CONFIG_READ', `peer.keyFile: cannot read ${file}: ${err.message}`, {
      field: 'peer.keyFile',
      file,
      errno: err.code,
    });
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
  const decoded = decodeBase64(raw.toString('latin1'));
  if (decoded !== undefined && decoded.length >= MIN_KEY_BYTES) return decoded;
  if (raw.length < MIN_KEY_BYTES) {
    invalid('peer.keyFile', `${file} holds ${raw.length} bytes; need at least ${MIN_KEY_BYTES} raw bytes or base64 of them`);
  }
  return raw;
}

function decodeBase64(text: string): Buffer | undefined {
  const s = text.replace(/\s+/g, '');
  if (s.length === 0 || s.length % 4 !== 0 || !/^[A-Za-z0-9+/]+={0,2}$/.test(s)) return undefined;
  return Buffer.from(s, 'base64');
}

// ---------------------------------------------------------------- vm

export function parseVmConfig(obj: unknown, opts: ParseOptions): VmConfig {
  const root = new Obj(obj, '', [
    'name',
    'qemu',
    'memoryMiB',
    'cpus',
    'kernel',
    'initrd',
    'append',
    'checkpoint',
    'disk',
    'migration',
    'nics',
    'gate',
  ]);
  const name = root.name('name');

  const q = root.optObj('qemu', ['binary', 'accel', 'machine', 'cpu', 'extraArgs']);
  const binaryRaw = q?.optString('binary') ?? 'qemu-system-x86_64';
  // A bare name is looked up in PATH; anything with a slash is a path relative to the file.
  const binary = binaryRaw.includes('/') ? path.resolve(opts.baseDir, binaryRaw) : binaryRaw;
  const accel = q?.optEnum('accel', ACCELS) ?? 'tcg';
  const machine = q?.optString('machine') ?? 'pc';
  const cpu = q?.optString('cpu') ?? (accel === 'kvm' ? 'host' : 'max');
  const extraArgs = q?.optStringArray('extraArgs') ?? [];

  const memoryMiB = root.int('memoryMiB', 16, 1024 * 1024);
  const cpus = root.optInt('cpus', 1, 255) ?? 1;
  const kernel = root.path('kernel', opts.baseDir);
  const initrd = root.optPath('initrd', opts.baseDir);
  const append = root.optString('append', { allowEmpty: true }) ?? '';

  const cp = root.optObj('checkpoint', ['intervalMs', 'failoverTimeoutMs', 'fenceTimeoutMs', 'dirtyTracker', 'hashThreads', 'window']);
  const intervalMs = cp?.optInt('intervalMs', 5, 10_000) ?? 50;
  const failoverTimeoutMs = cp?.optInt('failoverTimeoutMs', 100, 600_000) ?? 3000;
  const fenceTimeoutMs = cp?.optInt('fenceTimeoutMs', 50, 600_000) ?? 1500;
  const dirtyTracker = cp?.optEnum('dirtyTracker', DIRTY_TRACKERS) ?? 'auto';
  // Half the cores: the other half keeps QEMU (and the sidecar's event loop) going.
  const hashThreads = cp?.optInt('hashThreads', 1, 64) ?? Math.max(1, Math.floor(os.availableParallelism() / 2));
  // 1 = the next barrier waits for the previous ACK (no pipelining).
  const window = cp?.optInt('window', 1, MAX_CHECKPOINT_WINDOW) ?? DEFAULT_CHECKPOINT_WINDOW;
  // D must fence itself before S gives up on it, or both could run the guest.
  if (fenceTimeoutMs >= failoverTimeoutMs) {
    invalid('checkpoint.fenceTimeoutMs', `must be less than checkpoint.failoverTimeoutMs (${fenceTimeoutMs} >= ${failoverTimeoutMs})`);
  }
  // A fence shorter than one checkpoint interval would fire between healthy checkpoints.
  if (fenceTimeoutMs <= intervalMs) {
    invalid('checkpoint.fenceTimeoutMs', `must be greater than checkpoint.intervalMs (${fenceTimeoutMs} <= ${intervalMs})`);
  }

  const d = root.optObj('disk', ['image', 'journalMaxBytes', 'reconnectDelaySec']);
  let disk: DiskConfig | undefined;
  if (d) {
    // At least one maximum-sized NBD write (32 MiB) must fit, or a full journal could
    // never accept the write that waits for room.
    const journalMaxBytes = d.optInt('journalMaxBytes', MIN_JOURNAL_BYTES, MAX_JOURNAL_BYTES) ?? DEFAULT_JOURNAL_BYTES;
    const reconnectDelaySec = d.optInt('reconnectDelaySec', 1, 3600) ?? 30;
    disk = { image: d.path('image', opts.baseDir), journalMaxBytes, reconnectDelaySec };
  }

  const mig = root.optObj('migration', ['precopyMs', 'maxBandwidth', 'hotStandby']);
  const precopyMs = mig?.optInt('precopyMs', 0, 3_600_000) ?? 0;
  const maxBandwidth = mig?.optInt('maxBandwidth', 0, Number.MAX_SAFE_INTEGER) ?? 0;
  const hotStandby = mig?.optBool('hotStandby') ?? true;

  const nics = parseNics(root.optList('nics'), name);
  const gate = parseGate(root.optObj('gate', ['maxBytes', 'maxFrames']), opts);

  return {
    name,
    qemu: { binary, accel, machine, cpu, extraArgs },
    memoryMiB,
    cpus,
    kernel,
    ...(initrd !== undefined ? { initrd } : {}),
    append,
    checkpoint: { intervalMs, failoverTimeoutMs, fenceTimeoutMs, dirtyTracker, hashThreads, window },
    ...(disk ? { disk } : {}),
    migration: { precopyMs, maxBandwidth, hotStandby },
    nics,
    gate,
  };
}

/**
 * gate.maxBytes/maxFrames are a hard bound of what the relay holds; past it the relay
 * refuses frames (counted). The bound must at least take what QEMU hands the relay in one
 * go (its socket's send buffer and one longest record: src/gate/reserve.ts) plus working
 * room; the default is raised to that minimum where that is more.
 */
function parseGate(g: Obj | undefined, opts: ParseOptions): { maxBytes: number; maxFrames: number } {
  const reserve = gateReserve(opts.qemuSendBuffer);
  const min = gateMinimum(reserve);
  const dflt = gateDefaults(reserve);
  const why = (unit: string, r: number) =>
    `reserve ${r} ${unit} (what QEMU's relay socket hands over at once: its send buffer and one longest record; src/gate/reserve.ts) + working room`;
  const maxBytes = g?.optInt('maxBytes', 1, 1 << 30) ?? dflt.maxBytes;
  if (maxBytes < min.bytes) {
    invalid('gate.maxBytes', `must be at least ${min.bytes} on this host: ${why('bytes', reserve.bytes)}, got ${maxBytes}`, {
      minimum: min.bytes,
      reserve: reserve.bytes,
    });
  }
  const maxFrames = g?.optInt('maxFrames', 1, 1 << 20) ?? dflt.maxFrames;
  if (maxFrames < min.frames) {
    invalid('gate.maxFrames', `must be at least ${min.frames}: ${why('frames', reserve.frames)}, got ${maxFrames}`, {
      minimum: min.frames,
      reserve: reserve.frames,
    });
  }
  return { maxBytes, maxFrames };
}

/**
 * The second TAP of a NIC, for a hot standby: a single-queue TAP admits one opener, and
 * the running QEMU holds the first (docs/network.md "Hot standby"). Its name is the NIC's
 * TAP name (at most 13 bytes kept) with "-b".
 */
export const altTapName = (tap: string): string => `${tap.slice(0, 13)}-b`;

/** The TAPs a QEMU of a NIC may open, in order of preference. */
export const tapCandidates = (tap: string): string[] => [tap, altTapName(tap)];

/** Default TAP name of NIC i: "<vm>-<i>" when it fits in 15 bytes, else a hash of the VM name. */
export function defaultTapName(vm: string, i: number): string {
  const plain = `${vm}-${i}`;
  if (Buffer.byteLength(plain) <= 15) return plain;
  return `tt${createHash('sha256').update(vm).digest('hex').slice(0, 8)}-${i}`;
}

function parseNics(list: unknown[] | undefined, vm: string): NicConfig[] {
  if (list === undefined) return [];
  if (list.length > MAX_NICS) invalid('nics', `at most ${MAX_NICS} NICs, got ${list.length}`);
  const nics = list.map((item, i) => {
    const o = new Obj(item, `nics[${i}]`, ['mac', 'bridge', 'tap']);
    const macRaw = o.string('mac');
    const mac = macRaw.toLowerCase();
    if (!MAC_RE.test(mac)) invalid(`nics[${i}].mac`, `must be six hex octets "52:54:00:12:34:56", got ${describe(macRaw)}`);
    const first = parseInt(mac.slice(0, 2), 16);
    if (first & 1) invalid(`nics[${i}].mac`, `must be a unicast address (first octet even), got ${mac}`);
    if (mac === '00:00:00:00:00:00') invalid(`nics[${i}].mac`, 'must not be all zeros');
    const bridge = o.string('bridge');
    if (!IFNAME_RE.test(bridge))
      invalid(`nics[${i}].bridge`, `must be an interface name of 1-15 characters [A-Za-z0-9_.-], got ${describe(bridge)}`);
    const tap = o.optString('tap') ?? defaultTapName(vm, i);
    if (!IFNAME_RE.test(tap))
      invalid(`nics[${i}].tap`, `must be an interface name of 1-15 characters [A-Za-z0-9_.-], got ${describe(tap)}`);
    if (tap === bridge) invalid(`nics[${i}].tap`, `must differ from the bridge ${bridge}`);
    if (altTapName(tap) === bridge)
      invalid(`nics[${i}].tap`, `its second TAP ${altTapName(tap)} (a hot standby's) would be the bridge ${bridge}`);
    return { mac, bridge, tap };
  });
  for (let i = 0; i < nics.length; i++) {
    for (let j = 0; j < i; j++) {
      if (nics[j]!.mac === nics[i]!.mac) invalid(`nics[${i}].mac`, `duplicates nics[${j}].mac ${nics[i]!.mac}`);
      if (nics[j]!.tap === nics[i]!.tap) invalid(`nics[${i}].tap`, `duplicates nics[${j}].tap ${nics[i]!.tap}`);
      // each NIC also has a second TAP for a hot standby (src/net/tap.ts): no name may be shared
      const mine = tapCandidates(nics[i]!.tap);
      if (tapCandidates(nics[j]!.tap).some((n) => mine.includes(n)))
        invalid(`nics[${i}].tap`, `its TAPs ${mine.join(', ')} overlap those of nics[${j}] (${tapCandidates(nics[j]!.tap).join(', ')})`);
    }
  }
  return nics;
}

// ---------------------------------------------------------------- field reader

function invalid(field: string, message: string, details: Record<string, unknown> = {}): never {
  throw new TetherError('ERR_CONFIG_INVALID', `${field === '' ? '(root)' : field}: ${message}`, { ...details, field });
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'string') return `string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v)}`;
  if (typeof v === 'object') return 'a mapping';
  return `${typeof v} ${String(v)}`;
}

/** One YAML mapping with a known key set; typed getters that name the field on error. */
class Obj {
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
