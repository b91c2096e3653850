/**
 * The envelope of the small records a restarted sidecar decides from (vm.json, the
 * migration marker): magic, version, length and checksum, so that a damaged file is
 * an error, never mistaken for "no such record". Pure codec (records.ts does the I/O).
 *
 * Text, so that `cat` still shows the record. Disk facts:
 *   header line  "<magic> <version> <length> <crc>\n"   e.g. "TETHER-VM 1 245 0f3a9c1e\n"
 *                magic: the record's kind; version: decimal, the format of that kind's
 *                body (each kind counts its own: see records.ts); length: decimal byte
 *                count of the body; crc: CRC-32 of the body, 8 lowercase hex digits
 *   body         exactly <length> bytes of UTF-8 JSON, nothing after it
 */
import { crc32 } from 'node:zlib';
import { TetherError } from '../errors.ts';

/** The version written when a kind names none. */
export const STATE_FILE_VERSION = 1;
/** Far above any real record: a larger length field is damage, not a record. */
const MAX_BODY = 1024 * 1024;
const HEADER_RE = /^([A-Z][A-Z-]{0,31}) (\d{1,9}) (\d{1,9}) ([0-9a-f]{8})\n/;

export function encodeStateFile(magic: string, record: unknown, version: number = STATE_FILE_VERSION): Buffer {
  const body = Buffer.from(JSON.stringify(record), 'utf8');
  const crc = crc32(body).toString(16).padStart(8, '0');
  return Buffer.concat([Buffer.from(`${magic} ${version} ${body.length} ${crc}\n`, 'latin1'), body]);
}

/**
 * Decodes and verifies a state file of kind `magic` in format `version`. Throws
 * ERR_STATE_FILE_CORRUPT (bad magic, header, length, checksum or JSON) or
 * ERR_STATE_FILE_VERSION (another version; details.version says which).
 */
export function decodeStateFile(magic: string, file: Buffer, name: string, want: number = STATE_FILE_VERSION): unknown {
  const corrupt = (why: string): TetherError =>
    new TetherError('ERR_STATE_FILE_CORRUPT', `${name} is damaged (${why}): not recovered, nothing was changed`, { file: name });
  const head = HEADER_RE.exec(file.subarray(0, 64).toString('latin1'));
  if (!head) throw corrupt('no valid header');
  if (head[1] !== magic) throw corrupt(`magic ${head[1]}, expected ${magic}`);
  const version = Number(head[2]);
  if (version !== want) {
    throw new TetherError('ERR_STATE_FILE_VERSION', `${name} has format version ${version}; this tether reads ${want}`, {
      file: name,
      version,
    });
  }
  const length = Number(head[3]);
  if (length > MAX_BODY) throw corrupt(`length ${length} exceeds ${MAX_BODY}`);
  const body = file.subarray(head[0].length);
  if (body.length !== length) throw corrupt(`body is ${body.length} bytes, header says ${length}`);
  if (crc32(body).toString(16).padStart(8, '0') !== head[4]) throw corrupt('checksum mismatch');
  try {
    return JSON.parse(body.toString('utf8'));
  } catch {
    throw corrupt('body is not JSON');
  }
}
