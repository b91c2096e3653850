/**
 * The durable records of a VM on this host, in its directory <stateDir>/<vm>: what a restarted
 * sidecar decides from. Each is a state file (state-file.ts: magic, version, length, CRC)
 * written atomically (tmp + fsync + rename):
 *   vm.json          PersistedVm: config, sendConfiguration, the QEMU's identity (pid + start time)
 *   migration.json   MigrationMarker: a migration in progress (format MARKER_VERSION)
 *   unrecovered.json UnrecoveredCause: why a restart left the VM unrecovered
 *   standby.json     QemuIdentity of the last hot standby spawned
 * A missing record reads as null; a damaged one is an error (ERR_STATE_FILE_CORRUPT /
 * ERR_STATE_FILE_VERSION), never "no record", except where noted.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import type { VmConfig } from '../config/types.ts';
import { isMigrationId } from '../epoch/id.ts';
import { isTetherError, TetherError } from '../errors.ts';
import type { QemuIdentity } from '../qemu/identity.ts';
import { decodeStateFile, encodeStateFile } from './state-file.ts';

/** Kinds of the state files (see state-file.ts). */
const VM_MAGIC = 'TETHER-VM';
const MARKER_MAGIC = 'TETHER-MIGRATION';
const UNRECOVERED_MAGIC = 'TETHER-UNRECOVERED';
const STANDBY_MAGIC = 'TETHER-STANDBY';
/**
 * Format of the migration marker's body. 2: `migrationId` added. A marker of format 1 (written
 * before migration ids) cannot tell which migration a peer's answer is for: it is refused
 * (ERR_STATE_FILE_VERSION, the VM left unrecovered) rather than matched to any answer.
 */
export const MARKER_VERSION = 2;

export interface PersistedVm {
  config: VmConfig;
  sendConfiguration: boolean;
  pid: number | null;
  /**
   * /proc start time of `pid` (QemuIdentity), recorded when the QEMU was spawned. Absent in
   * records of older builds: such a pid cannot be told from a reused one, so recovery leaves
   * the VM unrecovered instead of guessing.
   */
  startTime?: string | null;
}

/** Why a restarted sidecar left a VM unrecovered (<dir>/unrecovered.json): kept until an operator resolves it. */
export interface UnrecoveredCause {
  code: string;
  message: string;
  at: string;
}

export interface MigrationMarker {
  role: 'source' | 'destination';
  /** The migration's id (control.ts MIGRATION_ID_RE): recovery answers, or waits for, that one only. */
  migrationId: string;
  /** The QEMU that was migrating: after a restart, any other QEMU on the RAM file is a newer one. */
  qemuPid: number | null;
  /** /proc start time of qemuPid (filled in by setMigrationMarker); absent in older markers. */
  qemuStartTime?: string | null;
  peer: string;
  startedAt: string;
}

export async function writeFileAtomic(file: string, data: Buffer): Promise<void> {
  const tmp = `${file}.tmp`;
  const fh = await fs.open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, file);
}

/** The file's bytes, or null when it does not exist; any other failure is an error. */
async function readOptional(file: string): Promise<Buffer | null> {
  try {
    return await fs.readFile(file);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    // ENOTDIR: `dir` is a file (the control socket may live in stateDir), so no record.
    if (err.code === 'ENOENT' || err.code === 'ENOTDIR') return null;
    throw new TetherError('ERR_STATE_FILE_CORRUPT', `cannot read ${file}: ${err.message}`, { file, errno: err.code });
  }
}

export async function writePersisted(dir: string, rec: PersistedVm): Promise<void> {
  await writeFileAtomic(path.join(dir, 'vm.json'), encodeStateFile(VM_MAGIC, rec));
}

/**
 * vm.json of the VM directory `dir`: null when there is none (no VM here); throws
 * ERR_STATE_FILE_CORRUPT / ERR_STATE_FILE_VERSION when it is damaged.
 */
export async function readPersisted(dir: string): Promise<PersistedVm | null> {
  const file = path.join(dir, 'vm.json');
  const raw = await readOptional(file);
  if (raw === null) return null;
  const v = decodeStateFile(VM_MAGIC, raw, file) as Partial<PersistedVm> | null;
  if (
    typeof v !== 'object' ||
    v === null ||
    typeof v.config !== 'object' ||
    v.config === null ||
    typeof v.sendConfiguration !== 'boolean' ||
    !(v.pid === null || Number.isInteger(v.pid)) ||
    !(v.startTime === undefined || v.startTime === null || typeof v.startTime === 'string')
  ) {
    throw new TetherError('ERR_STATE_FILE_CORRUPT', `${file} does not hold a VM record`, { file });
  }
  return v as PersistedVm;
}

/** Writes the marker of `dir` (null: removes it). */
export async function writeMarker(dir: string, m: MigrationMarker | null): Promise<void> {
  const file = path.join(dir, 'migration.json');
  if (m === null) await fs.rm(file, { force: true });
  else await writeFileAtomic(file, encodeStateFile(MARKER_MAGIC, m, MARKER_VERSION));
}

/**
 * The migration marker of `dir`: null when no migration is in progress; throws
 * ERR_STATE_FILE_CORRUPT / ERR_STATE_FILE_VERSION when it is damaged (never taken
 * for "no migration": that would adopt a wedged source or a fenced destination).
 */
export async function readMarker(dir: string): Promise<MigrationMarker | null> {
  const file = path.join(dir, 'migration.json');
  const raw = await readOptional(file);
  if (raw === null) return null;
  let m: Partial<MigrationMarker> | null;
  try {
    m = decodeStateFile(MARKER_MAGIC, raw, file, MARKER_VERSION) as Partial<MigrationMarker> | null;
  } catch (e) {
    if (isTetherError(e, 'ERR_STATE_FILE_VERSION') && e.details?.['version'] === 1) {
      throw new TetherError(
        'ERR_STATE_FILE_VERSION',
        `${file} was written by a tether without migration ids (format 1): the migration it records cannot be ` +
          "matched to its peer's answer; resolve it by hand (see docs/completion.md)",
        { file, version: 1 },
      );
    }
    throw e;
  }
  if (!isMarker(m)) throw new TetherError('ERR_STATE_FILE_CORRUPT', `${file} does not hold a migration marker`, { file });
  return m;
}

function isMarker(m: Partial<MigrationMarker> | null): m is MigrationMarker {
  return (
    typeof m === 'object' &&
    m !== null &&
    (m.role === 'source' || m.role === 'destination') &&
    isMigrationId(m.migrationId) &&
    (m.qemuPid === null || Number.isInteger(m.qemuPid)) &&
    (m.qemuStartTime === undefined || m.qemuStartTime === null || typeof m.qemuStartTime === 'string') &&
    typeof m.peer === 'string' &&
    typeof m.startedAt === 'string'
  );
}

export async function writeUnrecovered(dir: string, cause: UnrecoveredCause): Promise<void> {
  await writeFileAtomic(path.join(dir, 'unrecovered.json'), encodeStateFile(UNRECOVERED_MAGIC, cause));
}

/** unrecovered.json of `dir`: null when none; a damaged one still means unrecovered (its cause unreadable). */
export async function readUnrecovered(dir: string): Promise<UnrecoveredCause | null> {
  const file = path.join(dir, 'unrecovered.json');
  let raw: Buffer | null;
  try {
    raw = await readOptional(file);
  } catch (e) {
    return { code: 'ERR_STATE_FILE_CORRUPT', message: (e as Error).message, at: '' };
  }
  if (raw === null) return null;
  try {
    const v = decodeStateFile(UNRECOVERED_MAGIC, raw, file) as Partial<UnrecoveredCause> | null;
    if (v && typeof v.code === 'string' && typeof v.message === 'string')
      return { code: v.code, message: v.message, at: String(v.at ?? '') };
  } catch {
    /* damaged: reported below as such (the VM stays unrecovered either way) */
  }
  return { code: 'ERR_STATE_FILE_CORRUPT', message: `${file} is damaged (the VM was left unrecovered earlier)`, at: '' };
}

export async function writeStandby(dir: string, id: QemuIdentity): Promise<void> {
  await writeFileAtomic(path.join(dir, 'standby.json'), encodeStateFile(STANDBY_MAGIC, id));
}

/** The last hot standby recorded for `dir` (null: none, or an unreadable record: nothing to kill by it). */
export async function readStandby(dir: string): Promise<QemuIdentity | null> {
  const file = path.join(dir, 'standby.json');
  try {
    const raw = await readOptional(file);
    if (raw === null) return null;
    const v = decodeStateFile(STANDBY_MAGIC, raw, file) as Partial<QemuIdentity> | null;
    return v && Number.isInteger(v.pid) && typeof v.startTime === 'string' ? (v as QemuIdentity) : null;
  } catch {
    return null; // damaged: no identity to trust, so no process is ever signalled by it
  }
}
