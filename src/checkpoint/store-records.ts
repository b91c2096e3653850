/**
 * The checkpoint store's small records (store.ts), each JSON with a CRC-32 of its body:
 *   applied.json      {format 'tether-applied', version, epoch, devstate, devstateBytes,
 *                     devstateCrc32, crc32}: the last applied checkpoint and its device state
 *   completed.json    {format 'tether-completed', version, epoch, crc32}: the migration is over
 *   (completing)      the same shape, format 'tether-completing': the destination's record
 *                     that it asked the source to complete
 * crc32 is the CRC-32 of the JSON of the record without the crc32 field (keys in this order).
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { TetherError } from '../errors.ts';

export interface AppliedRecord {
  epoch: number;
  /** Name of the device-state file in the store's directory. */
  devstate: string;
}

export type DecodedApplied = AppliedRecord & { devstateBytes: number; devstateCrc32: number };

export const DEVSTATE_RE = /^devstate-(\d+)\.bin$/;
export const devstateName = (epoch: number): string => `devstate-${epoch}.bin`;

function appliedBody(r: AppliedRecord, devstateBytes: number, devstateCrc32: number): string {
  return JSON.stringify({
    format: 'tether-applied',
    version: 1,
    epoch: r.epoch,
    devstate: r.devstate,
    devstateBytes,
    devstateCrc32,
  });
}

export function encodeApplied(r: AppliedRecord, devstate: Buffer): Buffer {
  const body = appliedBody(r, devstate.length, crc32(devstate));
  const withCrc = `${body.slice(0, -1)},"crc32":${crc32(Buffer.from(body, 'utf8'))}}\n`;
  return Buffer.from(withCrc, 'utf8');
}

export function corruptApplied(message: string): TetherError {
  return new TetherError('ERR_CKPT_APPLIED_CORRUPT', `applied record: ${message}`);
}

export function decodeApplied(text: string): DecodedApplied {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw corruptApplied('not JSON');
  }
  if (typeof v !== 'object' || v === null) throw corruptApplied('not an object');
  const o = v as Record<string, unknown>;
  const { epoch, devstate, devstateBytes, devstateCrc32, crc32: crc } = o;
  if (o.format !== 'tether-applied' || o.version !== 1) throw corruptApplied('unknown format or version');
  if (
    !Number.isSafeInteger(epoch) ||
    (epoch as number) < 0 ||
    typeof devstate !== 'string' ||
    !DEVSTATE_RE.test(devstate) ||
    !Number.isSafeInteger(devstateBytes) ||
    !Number.isSafeInteger(devstateCrc32) ||
    typeof crc !== 'number'
  ) {
    throw corruptApplied('bad fields');
  }
  const r = { epoch: epoch as number, devstate };
  const body = appliedBody(r, devstateBytes as number, devstateCrc32 as number);
  if (crc32(Buffer.from(body, 'utf8')) !== crc) throw corruptApplied('checksum mismatch');
  return { ...r, devstateBytes: devstateBytes as number, devstateCrc32: devstateCrc32 as number };
}

/** Throws ERR_CKPT_DEVSTATE_CORRUPT unless the record's device-state file in `dir` is whole. */
export async function checkDevstate(dir: string, r: DecodedApplied): Promise<void> {
  let buf: Buffer;
  try {
    buf = await readFile(path.join(dir, r.devstate));
  } catch (e) {
    throw new TetherError('ERR_CKPT_DEVSTATE_CORRUPT', `device state ${r.devstate} unreadable: ${(e as Error).message}`);
  }
  if (buf.length !== r.devstateBytes || crc32(buf) !== r.devstateCrc32) {
    throw new TetherError('ERR_CKPT_DEVSTATE_CORRUPT', `device state ${r.devstate} does not match the applied record`);
  }
}

export type HandshakeFormat = 'tether-completed' | 'tether-completing';

function completedBody(epoch: number, format: HandshakeFormat): string {
  return JSON.stringify({ format, version: 1, epoch });
}

export function encodeCompleted(epoch: number, format: HandshakeFormat = 'tether-completed'): Buffer {
  const body = completedBody(epoch, format);
  return Buffer.from(`${body.slice(0, -1)},"crc32":${crc32(Buffer.from(body, 'utf8'))}}\n`, 'utf8');
}

export function decodeCompleted(text: string, format: HandshakeFormat = 'tether-completed'): number {
  const bad = (m: string) => new TetherError('ERR_CKPT_COMPLETED_CORRUPT', `completion record: ${m}`);
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw bad('not JSON');
  }
  if (typeof v !== 'object' || v === null) throw bad('not an object');
  const o = v as Record<string, unknown>;
  if (o.format !== format || o.version !== 1) throw bad('unknown format or version');
  if (!Number.isSafeInteger(o.epoch) || (o.epoch as number) < 0 || typeof o.crc32 !== 'number') throw bad('bad fields');
  if (crc32(Buffer.from(completedBody(o.epoch as number, format), 'utf8')) !== o.crc32) throw bad('checksum mismatch');
  return o.epoch as number;
}
