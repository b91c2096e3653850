/**
 * The server side of one NBD connection as a pure state machine: bytes in, events out.
 * No sockets, no timers, no device: the handshake is answered here (its replies depend
 * only on the export's name, size and flags), transmission requests are validated here
 * and handed out as typed requests; the thin socket adapter (server.ts) runs them
 * against a BlockDevice and encodes the replies with protocol.ts's `encodeSimpleReply`.
 *
 * Bounded: headers live in fixed buffers; option data is buffered only up to
 * `maxOptionBytes` (longer options are skipped byte by byte and refused with
 * REP_ERR_TOO_BIG, or REP_ERR_UNSUP when unknown); a WRITE payload is buffered only up
 * to `maxPayload` (a longer one is skipped and answered EINVAL). Every limit is checked
 * from the header, before a byte of the body is kept.
 *
 * Never throws on input: a request the spec lets us refuse becomes an error reply
 * (`send`), a violation that loses framing (bad magic, unknown client flags, an
 * EXPORT_NAME we cannot satisfy) becomes a `close` event with a stable error code.
 */
import { TetherError } from '../errors.ts';
import * as P from './protocol.ts';

export interface NbdExport {
  /** Name clients ask for (OPT_GO / OPT_EXPORT_NAME); "" (the default export) also selects it. */
  name: string;
  /** Bytes. */
  size: number;
  /** Whether TRIM and WRITE_ZEROES are advertised. */
  canTrim: boolean;
}

export interface NbdSessionOptions {
  /** Largest READ/WRITE/WRITE_ZEROES length accepted (advertised as the maximum block size). Default 32 MiB. */
  maxPayload?: number;
  /** Largest option data kept in memory. Default 8 KiB (an OPT_GO with a 4096-byte name and many info requests). */
  maxOptionBytes?: number;
  /** Options a client may send before it is deemed abusive and disconnected. Default 256. */
  maxOptions?: number;
}

export type NbdCommand = 'read' | 'write' | 'flush' | 'trim' | 'write-zeroes';

export interface NbdRequest {
  command: NbdCommand;
  /** The client's 8 opaque handle bytes, echoed in the reply. */
  handle: Buffer;
  offset: number;
  length: number;
  fua: boolean;
  /** WRITE_ZEROES: the client forbids punching a hole. */
  noHole: boolean;
  /** WRITE payload (exactly `length` bytes); empty otherwise. */
  data: Buffer;
}

export type NbdSessionEvent =
  /** Bytes for the client: handshake replies, and error replies the codec decided itself. */
  | { kind: 'send'; data: Buffer }
  /** Handshake done: from here on, requests. */
  | { kind: 'transmission'; exportName: string; flags: number }
  | { kind: 'request'; request: NbdRequest }
  /**
   * End of the connection. soft: the client asked (CMD_DISC, OPT_ABORT): finish every
   * request in flight, then close. hard: drop it now (`error` says why).
   */
  | { kind: 'close'; soft: boolean; error?: TetherError };

type State = 'client-flags' | 'option-header' | 'option-data' | 'option-skip' | 'request-header' | 'write-data' | 'write-skip' | 'closed';

const EMPTY = Buffer.alloc(0);
const ZEROES_124 = Buffer.alloc(124);
/** Offsets at or above 2^53 are past any export (sizes are JS numbers). */
const HI_LIMIT = 2 ** 21;

export const DEFAULT_MAX_OPTION_BYTES = 8 * 1024;
export const DEFAULT_MAX_OPTIONS = 256;

export class NbdSession {
  readonly export: NbdExport;
  readonly maxPayload: number;
  readonly maxOptionBytes: number;
  readonly maxOptions: number;
  /** Transmission flags this session advertises. */
  readonly transmissionFlags: number;
  #state: State = 'client-flags';
  #noZeroes = false;
  #options = 0;
  /** Where the current fixed-size item is being assembled, and how far. */
  #target: Buffer = Buffer.alloc(4);
  #have = 0;
  #skip = 0;
  readonly #header = Buffer.alloc(P.REQUEST_HEADER_BYTES);
  #option = 0;
  #optionLength = 0;
  /** Request header fields while its WRITE payload arrives. */
  #pending: { flags: number; handle: Buffer; hi: number; lo: number; length: number } | undefined;

  constructor(exp: NbdExport, opts: NbdSessionOptions = {}) {
    if (!Number.isSafeInteger(exp.size) || exp.size < 0) {
      throw new TetherError('ERR_NBD_INVALID_OPTION', `export size must be a safe integer >= 0, got ${exp.size}`, { size: exp.size });
    }
    if (Buffer.byteLength(exp.name) > P.MAX_STRING_BYTES || exp.name.includes('\0')) {
      throw new TetherError('ERR_NBD_INVALID_OPTION', 'export name too long or has NUL');
    }
    this.export = exp;
    this.maxPayload = opts.maxPayload ?? P.DEFAULT_MAX_PAYLOAD;
    this.maxOptionBytes = opts.maxOptionBytes ?? DEFAULT_MAX_OPTION_BYTES;
    this.maxOptions = opts.maxOptions ?? DEFAULT_MAX_OPTIONS;
    if (!Number.isInteger(this.maxPayload) || this.maxPayload < 4096 || this.maxPayload > 0xffffffff) {
      throw new TetherError('ERR_NBD_INVALID_OPTION', `maxPayload must be an integer in [4096, 2^32), got ${this.maxPayload}`, {
        maxPayload: this.maxPayload,
      });
    }
    this.transmissionFlags =
      P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | (exp.canTrim ? P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES : 0);
  }

  get state(): State {
    return this.#state;
  }

  /** The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags. */
  greeting(): Buffer {
    const b = Buffer.alloc(18);
    b.writeBigUInt64BE(P.NBDMAGIC, 0);
    b.writeBigUInt64BE(P.IHAVEOPT, 8);
    b.writeUInt16BE(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 16);
    return b;
  }

  push(chunk: Buffer): NbdSessionEvent[] {
    const out: NbdSessionEvent[] = [];
    let pos = 0;
    for (;;) {
      if (this.#state === 'closed') break;
      if (this.#state === 'option-skip' || this.#state === 'write-skip') {
        const n = Math.min(this.#skip, chunk.length - pos);
        this.#skip -= n;
        pos += n;
        if (this.#skip > 0) break;
        if (this.#state === 'option-skip') this.#optionSkipped(out);
        else this.#writeSkipped(out);
        continue;
      }
      if (this.#have < this.#target.length) {
        const n = Math.min(this.#target.length - this.#have, chunk.length - pos);
        if (n === 0) break;
        chunk.copy(this.#target, this.#have, pos, pos + n);
        this.#have += n;
        pos += n;
        if (this.#have < this.#target.length) break;
      }
      this.#complete(out);
    }
    return out;
  }

  #expect(state: State, target: Buffer): void {
    this.#state = state;
    this.#target = target;
    this.#have = 0;
  }

  #close(out: NbdSessionEvent[], soft: boolean, error?: TetherError): void {
    this.#state = 'closed';
    this.#target = EMPTY;
    this.#have = 0;
    out.push(error ? { kind: 'close', soft, error } : { kind: 'close', soft });
  }

  /** The current fixed-size item is complete. */
  #complete(out: NbdSessionEvent[]): void {
    switch (this.#state) {
      case 'client-flags':
        return this.#clientFlags(out);
      case 'option-header':
        return this.#optionHeader(out);
      case 'option-data':
        return this.#optionData(out, this.#target);
      case 'request-header':
        return this.#requestHeader(out);
      case 'write-data':
        return this.#writeData(out);
      default:
        return;
    }
  }

  // ---------------------------------------------------------------- handshake

  #clientFlags(out: NbdSessionEvent[]): void {
    const flags = this.#target.readUInt32BE(0);
    // Unknown or unadvertised client flags: the server MUST drop the connection.
    if ((flags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)) !== 0) {
      return this.#close(out, false, new TetherError('ERR_NBD_CLIENT_FLAGS', `unknown client flags 0x${flags.toString(16)}`));
    }
    // A client without C_FIXED_NEWSTYLE is served fixed newstyle anyway (the spec allows it).
    this.#noZeroes = (flags & P.FLAG_C_NO_ZEROES) !== 0;
    this.#expect('option-header', Buffer.alloc(P.OPTION_HEADER_BYTES));
  }

  #optionHeader(out: NbdSessionEvent[]): void {
    const h = this.#target;
    if (h.readBigUInt64BE(0) !== P.IHAVEOPT) {
      return this.#close(out, false, new TetherError('ERR_NBD_BAD_MAGIC', 'option without IHAVEOPT magic'));
    }
    if (++this.#options > this.maxOptions) {
      return this.#close(out, false, new TetherError('ERR_NBD_TOO_MANY_OPTIONS', `more than ${this.maxOptions} options`));
    }
    this.#option = h.readUInt32BE(8);
    this.#optionLength = h.readUInt32BE(12);
    if (this.#optionLength > this.maxOptionBytes) {
      this.#state = 'option-skip';
      this.#skip = this.#optionLength;
      this.#target = EMPTY;
      this.#have = 0;
      return;
    }
    this.#expect('option-data', Buffer.alloc(this.#optionLength));
  }

  #optionSkipped(out: NbdSessionEvent[]): void {
    const opt = this.#option;
    if (opt === P.OPT_EXPORT_NAME) {
      // EXPORT_NAME cannot be answered with an error: the spec demands termination.
      return this.#close(out, false, new TetherError('ERR_NBD_OPTION_TOO_BIG', `EXPORT_NAME of ${this.#optionLength} bytes`));
    }
    const known = [P.OPT_ABORT, P.OPT_LIST, P.OPT_INFO, P.OPT_GO, P.OPT_STRUCTURED_REPLY, P.OPT_STARTTLS].includes(opt);
    this.#reply(out, opt, known ? P.REP_ERR_TOO_BIG : P.REP_ERR_UNSUP, Buffer.from('option data too large'));
    this.#expect('option-header', Buffer.alloc(P.OPTION_HEADER_BYTES));
  }

  #optionData(out: NbdSessionEvent[], data: Buffer): void {
    const opt = this.#option;
    // Default next state; options that end the handshake overwrite it.
    this.#expect('option-header', Buffer.alloc(P.OPTION_HEADER_BYTES));
    switch (opt) {
      case P.OPT_EXPORT_NAME:
        return this.#optExportName(out, data);
      case P.OPT_ABORT:
        // MUST reply ACK (any data is ignored); the client then drops the connection.
        this.#reply(out, opt, P.REP_ACK);
        return this.#close(out, true);
      case P.OPT_LIST:
        if (data.length !== 0) return this.#reply(out, opt, P.REP_ERR_INVALID, Buffer.from('OPT_LIST takes no data'));
        return this.#optList(out);
      case P.OPT_INFO:
      case P.OPT_GO:
        return this.#optInfoGo(out, opt, data);
      default:
        // STRUCTURED_REPLY (simple replies suffice for QEMU and libnbd), STARTTLS (NOTLS
        // mode), META_CONTEXT (needs structured replies), and anything unknown.
        return this.#reply(out, opt, P.REP_ERR_UNSUP);
    }
  }

  #reply(out: NbdSessionEvent[], opt: number, type: number, data: Buffer = EMPTY): void {
    out.push({ kind: 'send', data: P.encodeOptionReply(opt, type, data) });
  }

  #matches(name: string): boolean {
    return name === this.export.name || name === '';
  }

  #optExportName(out: NbdSessionEvent[], data: Buffer): void {
    const name = P.decodeName(data);
    if (name === undefined || !this.#matches(name)) {
      return this.#close(out, false, new TetherError('ERR_NBD_UNKNOWN_EXPORT', 'EXPORT_NAME names no export of this server'));
    }
    const b = Buffer.alloc(this.#noZeroes ? 10 : 134);
    b.writeBigUInt64BE(BigInt(this.export.size), 0);
    b.writeUInt16BE(this.transmissionFlags, 8);
    if (!this.#noZeroes) ZEROES_124.copy(b, 10);
    out.push({ kind: 'send', data: b });
    this.#enterTransmission(out);
  }

  #optList(out: NbdSessionEvent[]): void {
    const name = Buffer.from(this.export.name);
    const d = Buffer.alloc(4 + name.length);
    d.writeUInt32BE(name.length, 0);
    name.copy(d, 4);
    this.#reply(out, P.OPT_LIST, P.REP_SERVER, d);
    this.#reply(out, P.OPT_LIST, P.REP_ACK);
  }

  /** Data: 32 name length, name, 16 number of info requests, 16 x n info types. */
  #optInfoGo(out: NbdSessionEvent[], opt: number, data: Buffer): void {
    if (data.length < 6) return this.#reply(out, opt, P.REP_ERR_INVALID, Buffer.from('option data shorter than 6 bytes'));
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 6) return this.#reply(out, opt, P.REP_ERR_INVALID, Buffer.from('name length exceeds option'));
    const nReq = data.readUInt16BE(4 + nameLen);
    if (6 + nameLen + 2 * nReq !== data.length) {
      return this.#reply(out, opt, P.REP_ERR_INVALID, Buffer.from('information request count does not match length'));
    }
    const name = P.decodeName(data.subarray(4, 4 + nameLen));
    if (name === undefined) return this.#reply(out, opt, P.REP_ERR_INVALID, Buffer.from('export name is not a valid string'));
    if (!this.#matches(name)) return this.#reply(out, opt, P.REP_ERR_UNKNOWN, Buffer.from('no such export'));
    const wanted = new Set<number>();
    for (let i = 0; i < nReq; i++) wanted.add(data.readUInt16BE(6 + nameLen + 2 * i));

    // NBD_INFO_EXPORT is mandatory before ACK.
    const exp = Buffer.alloc(12);
    exp.writeUInt16BE(P.INFO_EXPORT, 0);
    exp.writeBigUInt64BE(BigInt(this.export.size), 2);
    exp.writeUInt16BE(this.transmissionFlags, 10);
    this.#reply(out, opt, P.REP_INFO, exp);
    // Block sizes are sent unasked too (the spec allows it): minimum 1 (any alignment
    // works on a file), preferred 4096, maximum = the payload cap.
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(P.INFO_BLOCK_SIZE, 0);
    bs.writeUInt32BE(1, 2);
    bs.writeUInt32BE(4096, 6);
    bs.writeUInt32BE(this.maxPayload, 10);
    this.#reply(out, opt, P.REP_INFO, bs);
    if (wanted.has(P.INFO_NAME)) {
      const n = Buffer.from(this.export.name);
      const b = Buffer.alloc(2 + n.length);
      b.writeUInt16BE(P.INFO_NAME, 0);
      n.copy(b, 2);
      this.#reply(out, opt, P.REP_INFO, b);
    }
    this.#reply(out, opt, P.REP_ACK);
    // After GO's ACK both sides are in transmission; no zero padding follows.
    if (opt === P.OPT_GO) this.#enterTransmission(out);
  }

  #enterTransmission(out: NbdSessionEvent[]): void {
    this.#expect('request-header', this.#header);
    out.push({ kind: 'transmission', exportName: this.export.name, flags: this.transmissionFlags });
  }

  // ---------------------------------------------------------------- transmission

  #requestHeader(out: NbdSessionEvent[]): void {
    const h = this.#header;
    if (h.readUInt32BE(0) !== P.REQUEST_MAGIC) {
      // Framing is lost: nothing after this can be trusted to be a request.
      return this.#close(out, false, new TetherError('ERR_NBD_BAD_MAGIC', `request magic 0x${h.readUInt32BE(0).toString(16)}`));
    }
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const handle = Buffer.from(h.subarray(8, 16));
    const hi = h.readUInt32BE(16);
    const lo = h.readUInt32BE(20);
    const length = h.readUInt32BE(24);
    this.#expect('request-header', this.#header);

    if (type === P.CMD_WRITE) {
      this.#pending = { flags, handle, hi, lo, length };
      if (length > this.maxPayload) {
        // Skipped, not buffered: the framing survives and the client gets EINVAL.
        this.#state = 'write-skip';
        this.#skip = length;
        this.#target = EMPTY;
        return;
      }
      this.#expect('write-data', Buffer.allocUnsafe(length));
      return;
    }
    if (type === P.CMD_DISC) {
      // No reply; everything in flight is finished first, and the client sends nothing more.
      return this.#close(out, true);
    }
    this.#validate(out, type, flags, handle, hi, lo, length, EMPTY);
  }

  #writeData(out: NbdSessionEvent[]): void {
    const p = this.#pending!;
    const data = this.#target;
    this.#pending = undefined;
    this.#expect('request-header', this.#header);
    this.#validate(out, P.CMD_WRITE, p.flags, p.handle, p.hi, p.lo, p.length, data);
  }

  #writeSkipped(out: NbdSessionEvent[]): void {
    const p = this.#pending!;
    this.#pending = undefined;
    this.#expect('request-header', this.#header);
    out.push({ kind: 'send', data: P.encodeSimpleReply(p.handle, P.EINVAL) });
  }

  #validate(
    out: NbdSessionEvent[],
    type: number,
    flags: number,
    handle: Buffer,
    hi: number,
    lo: number,
    length: number,
    data: Buffer,
  ): void {
    const fail = (error: number): void => void out.push({ kind: 'send', data: P.encodeSimpleReply(handle, error) });
    const tf = this.transmissionFlags;
    let command: NbdCommand;
    let allowed = P.CMD_FLAG_FUA;
    switch (type) {
      case P.CMD_READ:
        command = 'read';
        break;
      case P.CMD_WRITE:
        command = 'write';
        break;
      case P.CMD_FLUSH:
        command = 'flush';
        break;
      case P.CMD_TRIM:
        if (!(tf & P.TFLAG_SEND_TRIM)) return fail(P.EINVAL);
        command = 'trim';
        break;
      case P.CMD_WRITE_ZEROES:
        if (!(tf & P.TFLAG_SEND_WRITE_ZEROES)) return fail(P.EINVAL);
        command = 'write-zeroes';
        allowed |= P.CMD_FLAG_NO_HOLE;
        break;
      default:
        // CACHE, BLOCK_STATUS (not advertised) and unknown commands: EINVAL.
        return fail(P.EINVAL);
    }
    if ((flags & ~allowed) !== 0) return fail(P.EINVAL);
    if (command === 'flush') {
      // offset and length are reserved and MUST be zero.
      if (hi !== 0 || lo !== 0 || length !== 0) return fail(P.EINVAL);
    } else {
      const isWrite = command === 'write' || command === 'write-zeroes';
      if (command !== 'trim' && length > this.maxPayload) return fail(P.EINVAL);
      const offset = hi * 2 ** 32 + lo;
      // Beyond the end: writes get ENOSPC, reads and trims EINVAL (spec "Error values").
      if (hi >= HI_LIMIT || offset + length > this.export.size) return fail(isWrite ? P.ENOSPC : P.EINVAL);
      out.push({
        kind: 'request',
        request: {
          command,
          handle,
          offset,
          length,
          fua: (flags & P.CMD_FLAG_FUA) !== 0,
          noHole: (flags & P.CMD_FLAG_NO_HOLE) !== 0,
          data,
        },
      });
      return;
    }
    out.push({
      kind: 'request',
      request: { command, handle, offset: 0, length: 0, fua: (flags & P.CMD_FLAG_FUA) !== 0, noHole: false, data: EMPTY },
    });
  }
}
