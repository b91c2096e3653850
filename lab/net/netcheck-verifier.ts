/**
 * I/O-free verifier of a netcheck conversation (tools/guest/netcheck.c): push the
 * bytes the guest sent, get back records and violations.
 *
 * Record: "<type> <counter> <seq> <nonce> <x> <chain>\n", chain = SHA-256(previous
 * chain || record text before " <chain>"), the first previous chain being 32 zero
 * bytes. A D record announces <x> raw payload bytes that follow it and are not hashed.
 * The client holds its own copy of the chain, so a record that the guest computed over
 * a history the client never saw (output of a rolled-back epoch on either side) fails.
 */
import { createHash } from 'node:crypto';

/** Longest record line netcheck sends (type, counters, nonce, 64-byte token, chain). */
export const MAX_LINE = 256;

export interface NetRecord {
  type: string;
  counter: number;
  seq: number;
  nonce: string;
  x: string;
}

export type Violation =
  | { kind: 'malformed'; detail: string }
  | { kind: 'chain-mismatch'; counter: number; seq: number; detail: string }
  | { kind: 'counter-regression'; expected: number; got: number }
  | { kind: 'seq-mismatch'; expected: number | null; got: number }
  | { kind: 'guest-error'; seq: number; reason: string };

export type VerifierOutput = { record: NetRecord } | { violation: Violation } | { payload: number };

export class ConversationVerifier {
  #chain = Buffer.alloc(32);
  #counter = 0;
  #buf = Buffer.alloc(0);
  #payloadLeft = 0;
  /** Seqs of requests sent and not answered yet, in order. */
  readonly pending: number[] = [];
  /** Once the chain broke, every later record would mismatch too: report once. */
  broken = false;

  get counter(): number {
    return this.#counter;
  }

  /** The client sent request `seq`; its answer must come next after earlier ones. */
  expect(seq: number): void {
    this.pending.push(seq);
  }

  push(chunk: Buffer): VerifierOutput[] {
    const out: VerifierOutput[] = [];
    let data = this.#buf.length ? Buffer.concat([this.#buf, chunk]) : chunk;
    for (;;) {
      if (this.#payloadLeft > 0) {
        const k = Math.min(this.#payloadLeft, data.length);
        if (k === 0) break;
        this.#payloadLeft -= k;
        data = data.subarray(k);
        out.push({ payload: k });
        continue;
      }
      const nl = data.indexOf(0x0a);
      if (nl < 0) {
        if (data.length > MAX_LINE) {
          out.push({ violation: { kind: 'malformed', detail: `line longer than ${MAX_LINE} bytes` } });
          this.broken = true;
          data = Buffer.alloc(0);
        }
        break;
      }
      const line = data.subarray(0, nl).toString('latin1');
      data = data.subarray(nl + 1);
      if (nl > MAX_LINE) {
        out.push({ violation: { kind: 'malformed', detail: `line longer than ${MAX_LINE} bytes` } });
        this.broken = true;
        continue;
      }
      out.push(...this.#line(line));
    }
    this.#buf = Buffer.from(data);
    return out;
  }

  #line(line: string): VerifierOutput[] {
    const f = line.split(' ');
    const m = /^[HADVWE]$/.test(f[0] ?? '') && f.length === 6 && /^\d+$/.test(f[1]!) && /^\d+$/.test(f[2]!);
    if (!m || !/^[0-9a-f]{16}$/.test(f[3]!) || !/^[0-9a-f]{64}$/.test(f[5]!)) {
      this.broken = true;
      return [{ violation: { kind: 'malformed', detail: JSON.stringify(line.slice(0, 120)) } }];
    }
    const rec: NetRecord = { type: f[0]!, counter: Number(f[1]), seq: Number(f[2]), nonce: f[3]!, x: f[4]! };
    const out: VerifierOutput[] = [];
    const text = line.slice(0, line.length - 65);
    const chain = createHash('sha256').update(this.#chain).update(text, 'latin1').digest();
    if (!this.broken && chain.toString('hex') !== f[5]) {
      this.broken = true;
      out.push({
        violation: {
          kind: 'chain-mismatch',
          counter: rec.counter,
          seq: rec.seq,
          detail: 'the guest chained this record over a history the client did not receive',
        },
      });
    }
    // Follow the guest's chain from here on so that later records are checked against
    // each other (a break is reported once, above).
    this.#chain = Buffer.from(f[5]!, 'hex');
    if (rec.counter !== this.#counter) out.push({ violation: { kind: 'counter-regression', expected: this.#counter, got: rec.counter } });
    this.#counter = rec.counter + 1;
    if (rec.type === 'H') {
      if (rec.counter !== 0) out.push({ violation: { kind: 'malformed', detail: 'greeting not first' } });
    } else {
      const want = this.pending.shift() ?? null;
      if (want !== rec.seq) out.push({ violation: { kind: 'seq-mismatch', expected: want, got: rec.seq } });
      if (rec.type === 'E') out.push({ violation: { kind: 'guest-error', seq: rec.seq, reason: rec.x } });
      if (rec.type === 'D') this.#payloadLeft = Number(rec.x);
    }
    out.push({ record: rec });
    return out;
  }
}

/** What netcheck would send: for tests of the verifier. */
export class RecordWriter {
  #chain = Buffer.alloc(32);
  #counter = 0;
  record(type: string, seq: number, nonce: string, x: string): Buffer {
    const text = `${type} ${this.#counter++} ${seq} ${nonce} ${x}`;
    this.#chain = createHash('sha256').update(this.#chain).update(text, 'latin1').digest();
    return Buffer.from(`${text} ${this.#chain.toString('hex')}\n`, 'latin1');
  }
}
