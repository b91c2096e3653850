/**
 * A set of non-overlapping byte extents, sorted by offset: one epoch of the
 * block-write journal. A later `put` wins over everything it overlaps; pieces of
 * older extents that stick out on either side are kept. Pure, no I/O.
 */
export interface Extent {
  offset: number;
  data: Buffer;
  /**
   * Bytes of the allocation `data` is a view of. Remnants of a split keep their
   * parent's buffer alive; a remnant smaller than half of it is copied, so the
   * memory really held stays below twice `bytes`.
   */
  backing: number;
}

export class ExtentMap {
  readonly #ext: Extent[] = [];
  #bytes = 0;

  /** Sum of the extents' lengths. */
  get bytes(): number {
    return this.#bytes;
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
      if (e.offset + e.data.length <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Records `data` at `offset` (the map takes ownership of `data`). */
  put(offset: number, data: Buffer): void {
    const len = data.length;
    if (len === 0) return;
    const end = offset + len;
    const i = this.#firstEndingAfter(offset);
    let j = i;
    const keep: Extent[] = [];
    while (j < this.#ext.length && this.#ext[j]!.offset < end) {
      const e = this.#ext[j]!;
      const eEnd = e.offset + e.data.length;
      this.#bytes -= e.data.length;
      if (e.offset < offset) keep.push(remnant(e, e.offset, e.data.subarray(0, offset - e.offset)));
      if (eEnd > end) keep.push(remnant(e, end, e.data.subarray(end - e.offset)));
      j++;
    }
    const repl: Extent[] = [];
    if (keep[0] && keep[0].offset < offset) repl.push(keep.shift()!);
    repl.push({ offset, data, backing: len });
    repl.push(...keep);
    for (const r of repl) this.#bytes += r.data.length;
    this.#ext.splice(i, j - i, ...repl);
  }

  /** Copies the parts of the extents that intersect [offset, offset + out.length) into out. */
  overlay(offset: number, out: Buffer): void {
    const end = offset + out.length;
    for (let i = this.#firstEndingAfter(offset); i < this.#ext.length; i++) {
      const e = this.#ext[i]!;
      if (e.offset >= end) break;
      const from = Math.max(offset, e.offset);
      const to = Math.min(end, e.offset + e.data.length);
      e.data.copy(out, from - offset, from - e.offset, to - e.offset);
    }
  }

  /**
   * The extents with adjacent ones merged, each at most `maxBytes` long (longer
   * runs are split). Offset order; never overlapping.
   */
  coalesced(maxBytes: number): { offset: number; data: Buffer }[] {
    const out: { offset: number; data: Buffer }[] = [];
    let run: Buffer[] = [];
    let runOff = 0;
    let runLen = 0;
    const flush = (): void => {
      if (runLen === 0) return;
      out.push({ offset: runOff, data: run.length === 1 ? run[0]! : Buffer.concat(run, runLen) });
      run = [];
      runLen = 0;
    };
    for (const e of this.#ext) {
      let off = e.offset;
      let data = e.data;
      while (data.length > 0) {
        if (runLen > 0 && (runOff + runLen !== off || runLen === maxBytes)) flush();
        if (runLen === 0) runOff = off;
        const take = Math.min(data.length, maxBytes - runLen);
        run.push(data.subarray(0, take));
        runLen += take;
        off += take;
        data = data.subarray(take);
      }
    }
    flush();
    return out;
  }
}

function remnant(parent: Extent, offset: number, data: Buffer): Extent {
  if (data.length * 2 < parent.backing) return { offset, data: Buffer.from(data), backing: data.length };
  return { offset, data, backing: parent.backing };
}
