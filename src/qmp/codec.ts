/**
 * QMP wire codec. Pure: no sockets, no timers.
 *
 * Wire facts (QEMU docs/interop/qmp-spec.txt):
 * - Every message is one JSON object on one line, terminated by "\r\n" from QEMU.
 *   We accept a bare "\n" too, and skip empty lines.
 * - Server → client objects are exactly one of:
 *     greeting  {"QMP": {"version": {...}, "capabilities": [...]}}
 *     success   {"return": <json>, "id": <echoed>}
 *     error     {"error": {"class": "GenericError", "desc": "..."}, "id": <echoed>}
 *     event     {"event": "STOP", "data": {...}, "timestamp": {"seconds": n, "microseconds": n}}
 * - "id" is echoed verbatim when the command carried one; an error caused by an unparsable
 *   command has no id. QEMU runs commands of one monitor in order, but correlation is by id.
 */
import { TetherError } from '../errors.ts';

export type QmpId = string | number;

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

/** A QMP event timestamp (QEMU's gettimeofday) in milliseconds since the epoch. */
export function qmpTimeMs(ts: QmpTimestamp): number {
  return ts.seconds * 1000 + ts.microseconds / 1000;
}

export interface QmpGreeting {
  type: 'greeting';
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export interface QmpReturn {
  type: 'return';
  id: QmpId | undefined;
  value: unknown;
}

export interface QmpErrorReply {
  type: 'error';
  id: QmpId | undefined;
  /** QEMU's error class, e.g. "GenericError", "CommandNotFound", "DeviceNotActive". */
  errorClass: string;
  desc: string;
}

export interface QmpEvent {
  type: 'event';
  event: string;
  data: Record<string, unknown>;
  timestamp: QmpTimestamp;
}

export type QmpMessage = QmpGreeting | QmpReturn | QmpErrorReply | QmpEvent;

export interface QmpDecoderOptions {
  /** Longest accepted line in bytes, without the terminator. Default 1 MiB. */
  maxLineBytes?: number;
}

export const DEFAULT_MAX_LINE_BYTES = 1024 * 1024;

const LF = 0x0a; // \n
const CR = 0x0d; // \r

/**
 * Splits a QMP byte stream into classified messages.
 *
 * States: 'open' → 'failed'. Any error is fatal (the stream has lost framing or QEMU is
 * not speaking QMP); later pushes rethrow the same error, so the caller cannot silently
 * resync on a half-understood stream.
 */
export class QmpDecoder {
  readonly maxLineBytes: number;
  private state: 'open' | 'failed' = 'open';
  private failure: TetherError | undefined;
  /** Bytes of the current, unterminated line. Decoded only once complete (UTF-8 safe). */
  private pending: Buffer[] = [];
  private pendingBytes = 0;

  constructor(opts: QmpDecoderOptions = {}) {
    const max = opts.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
    if (!Number.isInteger(max) || max < 1) {
      throw new TetherError('ERR_CONFIG_INVALID', `maxLineBytes must be a positive integer, got ${max}`, { field: 'maxLineBytes' });
    }
    this.maxLineBytes = max;
  }

  /** Bytes buffered for the current incomplete line. */
  get bufferedBytes(): number {
    return this.pendingBytes;
  }

  push(chunk: Buffer | string): QmpMessage[] {
    if (this.state === 'failed') throw this.failure!;
    const buf = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk;
    const out: QmpMessage[] = [];
    try {
      let start = 0;
      for (;;) {
        const nl = buf.indexOf(LF, start);
        if (nl === -1) {
          const rest = buf.length - start;
          // Limit checked before buffering: a peer that never sends "\n" costs at most maxLineBytes.
          // +1 allows a trailing CR that belongs to the terminator.
          if (this.pendingBytes + rest > this.maxLineBytes + 1) this.tooLong(this.pendingBytes + rest);
          if (rest > 0) {
            this.pending.push(buf.subarray(start));
            this.pendingBytes += rest;
          }
          break;
        }
        let line: Buffer;
        if (this.pendingBytes === 0) {
          line = buf.subarray(start, nl);
        } else {
          if (this.pendingBytes + (nl - start) > this.maxLineBytes + 1) this.tooLong(this.pendingBytes + (nl - start));
          this.pending.push(buf.subarray(start, nl));
          line = Buffer.concat(this.pending, this.pendingBytes + (nl - start));
          this.pending = [];
          this.pendingBytes = 0;
        }
        start = nl + 1;
        if (line.length > 0 && line[line.length - 1] === CR) line = line.subarray(0, line.length - 1);
        if (line.length > this.maxLineBytes) this.tooLong(line.length);
        if (line.length === 0) continue;
        out.push(classify(line.toString('utf8')));
      }
    } catch (e) {
      this.state = 'failed';
      this.failure = e instanceof TetherError ? e : new TetherError('ERR_QMP_MALFORMED', String(e));
      this.pending = [];
      this.pendingBytes = 0;
      throw this.failure;
    }
    return out;
  }

  private tooLong(bytes: number): never {
    throw new TetherError('ERR_QMP_LINE_TOO_LONG', `QMP line exceeds ${this.maxLineBytes} bytes`, {
      maxLineBytes: this.maxLineBytes,
      bytes,
    });
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function malformed(reason: string, line: string): never {
  throw new TetherError('ERR_QMP_MALFORMED', `malformed QMP message: ${reason}`, {
    line: line.length > 200 ? `${line.slice(0, 200)}…` : line,
  });
}

function readId(obj: Record<string, unknown>, line: string): QmpId | undefined {
  if (!('id' in obj)) return undefined;
  const id = obj['id'];
  if (typeof id === 'string' || typeof id === 'number') return id;
  return malformed('"id" is neither string nor number', line);
}

function isUint(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0;
}

/** Classifies one complete JSON line. Exported for tests and tools. */
export function classify(line: string): QmpMessage {
  let obj: unknown;
  try {
    obj = JSON.parse(line);
  } catch (e) {
    return malformed(`invalid JSON (${(e as Error).message})`, line);
  }
  if (!isObject(obj)) return malformed('not a JSON object', line);

  if ('return' in obj) {
    return { type: 'return', id: readId(obj, line), value: obj['return'] };
  }
  if ('error' in obj) {
    const err = obj['error'];
    if (!isObject(err) || typeof err['class'] !== 'string' || typeof err['desc'] !== 'string') {
      return malformed('"error" lacks string "class"/"desc"', line);
    }
    return { type: 'error', id: readId(obj, line), errorClass: err['class'], desc: err['desc'] };
  }
  if ('event' in obj) {
    const name = obj['event'];
    if (typeof name !== 'string' || name === '') return malformed('"event" is not a non-empty string', line);
    const data = obj['data'] ?? {};
    if (!isObject(data)) return malformed('"data" is not an object', line);
    const ts = obj['timestamp'];
    if (!isObject(ts) || !isUint(ts['seconds']) || !isUint(ts['microseconds'])) {
      return malformed('"timestamp" lacks integer "seconds"/"microseconds"', line);
    }
    return {
      type: 'event',
      event: name,
      data,
      timestamp: { seconds: ts['seconds'], microseconds: ts['microseconds'] },
    };
  }
  if ('QMP' in obj) {
    const g = obj['QMP'];
    if (!isObject(g) || !isObject(g['version']) || !Array.isArray(g['capabilities'])) {
      return malformed('greeting lacks "version"/"capabilities"', line);
    }
    const v = g['version'];
    const q = isObject(v['qemu']) ? v['qemu'] : {};
    return {
      type: 'greeting',
      version: {
        qemu: {
          major: isUint(q['major']) ? q['major'] : 0,
          minor: isUint(q['minor']) ? q['minor'] : 0,
          micro: isUint(q['micro']) ? q['micro'] : 0,
        },
        package: typeof v['package'] === 'string' ? v['package'] : '',
      },
      capabilities: g['capabilities'].filter((c): c is string => typeof c === 'string'),
    };
  }
  return malformed('none of "return", "error", "event", "QMP"', line);
}

/** One command line as QEMU expects it: {"execute": ..., "arguments": ..., "id": ...}\n */
export function encodeCommand(execute: string, args: Record<string, unknown> | undefined, id: QmpId): string {
  const msg: Record<string, unknown> = { execute };
  if (args !== undefined) msg['arguments'] = args;
  msg['id'] = id;
  // JSON.stringify never emits a raw newline (it escapes them inside strings), so one line.
  return `${JSON.stringify(msg)}\n`;
}
