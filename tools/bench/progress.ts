/**
 * The guest's own progress, seen from the host: memcheck prints its position (4 lines per
 * pass over its buffer, tools/guest/memcheck.c); this tails serial logs, stamps each line with
 * the wall time it appeared, and interpolates pages written between any two instants.
 */
import fs from 'node:fs';

const r2 = (v: number): number => Math.round(v * 100) / 100;

/** Memcheck position samples: cumulative pages written since the guest started, with wall time. */
export class ProgressTail {
  readonly samples: { t: number; pos: number }[] = [];
  pages = 0;
  #files = new Map<string, { off: number; rest: string }>();
  #timer: NodeJS.Timeout | undefined;

  /** pollMs 0: no timer, the caller polls (tests). */
  constructor(pollMs = 20) {
    this.#timer = pollMs > 0 ? setInterval(() => this.poll(), pollMs) : undefined;
  }
  watch(file: string): void {
    if (!this.#files.has(file)) this.#files.set(file, { off: 0, rest: '' });
  }
  poll(t = Date.now()): void {
    for (const [file, st] of this.#files) {
      let fd: number;
      try {
        fd = fs.openSync(file, 'r');
      } catch {
        continue;
      }
      try {
        const size = fs.fstatSync(fd).size;
        if (size <= st.off) continue;
        const buf = Buffer.alloc(size - st.off);
        fs.readSync(fd, buf, 0, buf.length, st.off);
        st.off = size;
        const lines = (st.rest + buf.toString('latin1')).split(/\r?\n/);
        st.rest = lines.pop() ?? '';
        for (const line of lines) this.#line(t, line);
      } finally {
        fs.closeSync(fd);
      }
    }
  }
  #line(t: number, line: string): void {
    let m = /memcheck start mb=\d+ pages=(\d+)/.exec(line);
    if (m) this.pages = Number(m[1]);
    if (!this.pages) return;
    m = /memcheck progress pass=(\d+) page=(\d+)/.exec(line);
    if (m) return void this.samples.push({ t, pos: (Number(m[1]) - 1) * this.pages + Number(m[2]) });
    m = /memcheck pass (\d+) /.exec(line);
    if (m) this.samples.push({ t, pos: Number(m[1]) * this.pages });
  }
  /** Pages written by wall time t, interpolated; null outside the samples. Lines seen in one poll share its time: the last counts. */
  posAt(t: number): number | null {
    const s = this.samples;
    if (!s.length || t < s[0]!.t || t > s[s.length - 1]!.t) return null;
    let i = 0;
    while (i + 1 < s.length && s[i + 1]!.t <= t) i++;
    const a = s[i]!;
    if (a.t === t || i + 1 === s.length) return a.pos;
    const b = s[i + 1]!;
    return a.pos + ((b.pos - a.pos) * (t - a.t)) / (b.t - a.t);
  }
  rate(from: number, to: number): number | null {
    const a = this.posAt(from);
    const b = this.posAt(to);
    return a === null || b === null || to <= from ? null : r2(((b - a) / (to - from)) * 1000);
  }
  /** The undisturbed rate before wall time t: over up to 10 s, after the first pass (which fills the buffer). */
  baseline(t: number): number | null {
    const firstPass = this.samples.find((s) => s.pos >= this.pages);
    return firstPass ? this.rate(Math.max(firstPass.t, t - 10_000), t) : null;
  }
  stop(): void {
    clearInterval(this.#timer);
    this.poll();
  }
}
