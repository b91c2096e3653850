/**
 * A set of non-overlapping byte extents, sorted by offset: one epoch of the
 * block-write journal. A later `put` wins over everything it overlaps; pieces of
 * older extents that stick out on either side are kept. Pure, no I/O.
 *
 * An extent either holds bytes or reads as zeroes (`data: null`: TRIM and
 * WRITE_ZEROES): a zero extent costs no memory whatever its length.
 */
export interface Extent {
  offset: number;
  length: number;
  /** The bytes, or null: the range reads as zeroes. */
  data: Buffer | null;
  /**
   * Bytes of the allocation `data` is a view of (0 for a zero extent). Remnants of a
   * split keep their parent's buffer alive; a remnant smaller than half of it is
   * copied, so the memory really held stays below twice `dataBytes`.
   */
  backing: number;
}

/** What coalesced() hands out: bytes, or a range that reads as zeroes. */
export type CoalescedExtent =
  { offset: number; data: Buffer; zero?: undefined } | { offset: number; length: number; zero: true; data?: undefined };

export class ExtentMap {
  readonly #ext: Extent[] = [];
  #bytes = 0;
  #dataBytes = 0;

  /** Sum of the extents' lengths (zero extents included). */
  get bytes(): number {
    return this.#bytes;
  }

  /** Sum of the lengths of the extents that hold bytes (the memory they cost). */
  get dataBytes(): number {
    return this.#dataBytes;
  }

  get size(): number {
    return this.#ext.length;
  }

  /** The extents in offset order (do not modify). */
  extents(): readonly Extent[] {
    return this.#ext;
  }

  /** Index of the first extent that ends after `offset`. */
  #firstEndingAfter(offset: number): number {
    let lo = 0;
    let hi = this.#ext.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const e = this.#ext[mid]!;
      if (e.offset + e.length <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Records `data` at `offset` (the map takes ownership of `data`). */
  put(offset: number, data: Buffer): void {
    this.#put(offset, data.length, data);
  }

  /** Records that [offset, offset + length) reads as zeroes. */
  putZeroes(offset: number, length: number): void {
    this.#put(offset, length, null);
  }

  #put(offset: number, len: number, data: Buffer | null): void {
    if (len === 0) return;
    const end = offset + len;
    const i = this.#firstEndingAfter(offset);
    let j = i;
    const keep: Extent[] = [];
    while (j < this.#ext.length && this.#ext[j]!.offset < end) {
      const e = this.#ext[j]!;
      const eEnd = e.offset + e.length;
      this.#count(e, -1);
      if (e.offset < offset) keep.push(remnant(e, e.offset, 0, offset - e.offset));
      if (eEnd > end) keep.push(remnant(e, end, end - e.offset, eEnd - end));
      j++;
    }
    const repl: Extent[] = [];
    if (keep[0] && keep[0].offset < offset) repl.push(keep.shift()!);
    repl.push({ offset, length: len, data, backing: data ? len : 0 });
    repl.push(...keep);
    for (const r of repl) this.#count(r, 1);
    this.#ext.splice(i, j - i, ...repl);
  }

  #count(e: Extent, sign: 1 | -1): void {
    this.#bytes += sign * e.length;
    if (e.data) this.#dataBytes += sign * e.length;
  }

  /** Pushes [from, to) of every extent that intersects [offset, end) into out (clipped to it). */
  spans(offset: number, end: number, out: [number, number][]): void {
    for (let i = this.#firstEndingAfter(offset); i < this.#ext.length; i++) {
      const e = this.#ext[i]!;
      if (e.offset >= end) break;
      out.push([Math.max(offset, e.offset), Math.min(end, e.offset + e.length)]);
    }
  }

  /** Copies the parts of the extents that intersect [offset, offset + out.length) into out. */
  overlay(offset: number, out: Buffer): void {
    const end = offset + out.length;
    for (let i = this.#firstEndingAfter(offset); i < this.#ext.length; i++) {
      const e = this.#ext[i]!;
      if (e.offset >= end) break;
      const from = Math.max(offset, e.offset);
      const to = Math.min(end, e.offset + e.length);
      if (e.data) e.data.copy(out, from - offset, from - e.offset, to - e.offset);
      else out.fill(0, from - offset, to - offset);
    }
  }

  /**
   * The extents with adjacent ones merged, data extents each at most `maxBytes` long,
   * zero extents at most `maxZeroBytes` (longer runs are split). Offset order; never
   * overlapping. Zero extents merge only with zero extents and come out as
   * `{ offset, length, zero: true }`: nothing is allocated for them.
   */
  coalesced(maxBytes: number, maxZeroBytes: number = maxBytes): CoalescedExtent[] {
    const out: CoalescedExtent[] = [];
    let run: Buffer[] = [];
    let runOff = 0;
    let runLen = 0;
    let runZero = false;
    const max = maxZeroBytes;
    const flush = (): void => {
      if (runLen === 0) return;
      if (runZero) out.push({ offset: runOff, length: runLen, zero: true });
      else out.push({ offset: runOff, data: run.length === 1 ? run[0]! : Buffer.concat(run, runLen) });
      run = [];
      runLen = 0;
    };
    for (const e of this.#ext) {
      let off = e.offset;
      let left = e.length;
      let at = 0;
      const zero = e.data === null;
      while (left > 0) {
        const limit = zero ? max : maxBytes;
        if (runLen > 0 && (runOff + runLen !== off || runZero !== zero || runLen >= limit)) flush();
        if (runLen === 0) {
          runOff = off;
          runZero = zero;
        }
        const take = Math.min(left, limit - runLen);
        if (!zero) run.push(e.data!.subarray(at, at + take));
        runLen += take;
        off += take;
        at += take;
        left -= take;
      }
    }
    flush();
    return out;
  }
}

function remnant(parent: Extent, offset: number, from: number, length: number): Extent {
  if (!parent.data) return { offset, length, data: null, backing: 0 };
  const data = parent.data.subarray(from, from + length);
  if (length * 2 < parent.backing) return { offset, length, data: Buffer.from(data), backing: length };
  return { offset, length, data, backing: parent.backing };
}
