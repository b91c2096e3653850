import { TetherError } from '../errors.ts';

/**
 * CLI <-> daemon control protocol: newline-delimited JSON over a unix socket.
 *   request:  {"id":1,"method":"migrate","params":{...}}
 *   progress: {"id":1,"progress":{...}}      (zero or more, only for streaming methods)
 *   reply:    {"id":1,"result":{...}} | {"id":1,"error":{"code":"ERR_...","message":"..."}}
 */
export interface ControlRequest {
  id: number;
  method: string;
  params: Record<string, unknown>;
}
export type ControlReply =
  | { id: number; result: unknown }
  | { id: number; error: { code: string; message: string; details?: unknown } }
  | { id: number; progress: Record<string, unknown> };

export class LineDecoder {
  #buf = '';
  readonly #maxLine: number;
  constructor(maxLine = 1 << 20) {
    this.#maxLine = maxLine;
  }
  push(chunk: Buffer | string): unknown[] {
    this.#buf += typeof chunk === 'string' ? chunk : chunk.toString('utf8');
    const out: unknown[] = [];
    let nl: number;
    while ((nl = this.#buf.indexOf('\n')) >= 0) {
      const line = this.#buf.slice(0, nl);
      this.#buf = this.#buf.slice(nl + 1);
      if (line.trim() === '') continue;
      try {
        out.push(JSON.parse(line));
      } catch {
        throw new TetherError('ERR_CONTROL_MALFORMED', 'control message is not valid JSON');
      }
    }
    if (this.#buf.length > this.#maxLine) {
      throw new TetherError('ERR_CONTROL_LINE_TOO_LONG', `control line exceeds ${this.#maxLine} bytes`);
    }
    return out;
  }
}

export function parseRequest(v: unknown): ControlRequest {
  if (typeof v !== 'object' || v === null) throw new TetherError('ERR_CONTROL_MALFORMED', 'request must be an object');
  const r = v as Record<string, unknown>;
  if (typeof r.id !== 'number' || !Number.isInteger(r.id)) throw new TetherError('ERR_CONTROL_MALFORMED', 'request.id must be an integer');
  if (typeof r.method !== 'string') throw new TetherError('ERR_CONTROL_MALFORMED', 'request.method must be a string');
  const params = r.params ?? {};
  if (typeof params !== 'object' || params === null || Array.isArray(params)) {
    throw new TetherError('ERR_CONTROL_MALFORMED', 'request.params must be an object');
  }
  return { id: r.id, method: r.method, params: params as Record<string, unknown> };
}

export const encodeLine = (v: unknown): string => JSON.stringify(v) + '\n';
