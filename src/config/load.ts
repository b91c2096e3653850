/**
 * YAML → validated HostConfig / VmConfig.
 *
 * Strict: unknown keys are errors (a typo must not silently fall back to a default).
 * Every error is ERR_CONFIG_INVALID with `details.field` = dotted path ("checkpoint.intervalMs")
 * and a message "<field>: <what is wrong>". Relative paths are resolved against `baseDir`
 * (the YAML file's directory when loading a file). The field reader (Obj) is fields.ts, the
 * NIC list nics.ts.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { TetherError } from '../errors.ts';
import type { DirtyTrackerKind, DiskConfig, HostConfig, VmConfig } from './types.ts';
import { DEFAULT_CHECKPOINT_WINDOW, MAX_CHECKPOINT_WINDOW } from '../epoch/limits.ts';
import { gateDefaults, gateMinimum, gateReserve } from '../gate/reserve.ts';
import { describe, invalid, MAX_UNIX_PATH, Obj } from './fields.ts';
import { parseNics } from './nics.ts';

// Moved to fields.ts and nics.ts; re-exported for the callers that import them from here.
export { isValidName } from './fields.ts';
export { altTapName, defaultTapName, tapCandidates } from './nics.ts';

export interface ParseOptions {
  /** Directory relative paths are resolved against. */
  baseDir: string;
  /**
   * The send buffer of QEMU's end of the relay's out socket on this host, part of the
   * gate's minimum (default: net.core.wmem_default, see qemuSendBuffer in src/gate/reserve.ts).
   */
  qemuSendBuffer?: number;
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
const MIN_JOURNAL_BYTES = 32 * 1024 * 1024;
/** Smallest write-ahead log segment: below it a rotation's fdatasync and file creation cost more than the space they free. */
const MIN_SEGMENT_BYTES = 256 * 1024;
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
  const qemu = parseQemu(root.optObj('qemu', ['binary', 'accel', 'machine', 'cpu', 'extraArgs']), opts.baseDir);
  const memoryMiB = root.int('memoryMiB', 16, 1024 * 1024);
  const cpus = root.optInt('cpus', 1, 255) ?? 1;
  const kernel = root.path('kernel', opts.baseDir);
  const initrd = root.optPath('initrd', opts.baseDir);
  const append = root.optString('append', { allowEmpty: true }) ?? '';

  const checkpoint = parseCheckpoint(
    root.optObj('checkpoint', ['intervalMs', 'failoverTimeoutMs', 'fenceTimeoutMs', 'dirtyTracker', 'hashThreads', 'window']),
  );
  const disk = parseDisk(root.optObj('disk', ['image', 'journalMaxBytes', 'journalSegmentBytes', 'reconnectDelaySec']), opts.baseDir);

  const mig = root.optObj('migration', ['precopyMs', 'maxBandwidth', 'hotStandby']);
  const precopyMs = mig?.optInt('precopyMs', 0, 3_600_000) ?? 0;
  const maxBandwidth = mig?.optInt('maxBandwidth', 0, Number.MAX_SAFE_INTEGER) ?? 0;
  const hotStandby = mig?.optBool('hotStandby') ?? true;

  const nics = parseNics(root.optList('nics'), name);
  const gate = parseGate(root.optObj('gate', ['maxBytes', 'maxFrames']), opts);

  return {
    name,
    qemu,
    memoryMiB,
    cpus,
    kernel,
    ...(initrd !== undefined ? { initrd } : {}),
    append,
    checkpoint,
    ...(disk ? { disk } : {}),
    migration: { precopyMs, maxBandwidth, hotStandby },
    nics,
    gate,
  };
}

function parseQemu(q: Obj | undefined, baseDir: string): VmConfig['qemu'] {
  const binaryRaw = q?.optString('binary') ?? 'qemu-system-x86_64';
  // A bare name is looked up in PATH; anything with a slash is a path relative to the file.
  const binary = binaryRaw.includes('/') ? path.resolve(baseDir, binaryRaw) : binaryRaw;
  const accel = q?.optEnum('accel', ACCELS) ?? 'tcg';
  const machine = q?.optString('machine') ?? 'pc';
  const cpu = q?.optString('cpu') ?? (accel === 'kvm' ? 'host' : 'max');
  const extraArgs = q?.optStringArray('extraArgs') ?? [];
  return { binary, accel, machine, cpu, extraArgs };
}

function parseCheckpoint(cp: Obj | undefined): VmConfig['checkpoint'] {
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
  return { intervalMs, failoverTimeoutMs, fenceTimeoutMs, dirtyTracker, hashThreads, window };
}

function parseDisk(d: Obj | undefined, baseDir: string): DiskConfig | undefined {
  if (!d) return undefined;
  // At least one maximum-sized NBD write (32 MiB) must fit, or a full journal could
  // never accept the write that waits for room.
  const journalMaxBytes = d.optInt('journalMaxBytes', MIN_JOURNAL_BYTES, MAX_JOURNAL_BYTES) ?? DEFAULT_JOURNAL_BYTES;
  const reconnectDelaySec = d.optInt('reconnectDelaySec', 1, 3600) ?? 30;
  // The write-ahead log's segments: one is deleted once the source acknowledged all it holds.
  const journalSegmentBytes = d.optInt('journalSegmentBytes', MIN_SEGMENT_BYTES, MAX_JOURNAL_BYTES) ?? Math.floor(journalMaxBytes / 2);
  return { image: d.path('image', baseDir), journalMaxBytes, journalSegmentBytes, reconnectDelaySec };
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
