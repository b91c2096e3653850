/**
 * The client-visible stall after switchover (issue 16), from the arrival times of a
 * client's answers: the time from the last answer at or before the switchover to the first
 * answer after it. Without a switchover time, the largest gap between consecutive answers
 * inside the migration. Pure: `npm run bench net -- --only stall` measures, this computes.
 */

export interface StallFigure {
  /** firstAfter − lastBefore, ms; null when the series has no answer on one side. */
  ms: number | null;
  lastBefore: number | null;
  firstAfter: number | null;
  /** How the gap was chosen: around the switchover time, or the largest one (no switchover time). */
  how: 'switchover' | 'largest-gap';
}

/** The largest gap between consecutive answer times inside [from, to] (ms; unsorted input is fine). */
export function largestGap(times: number[], from = -Infinity, to = Infinity): StallFigure {
  const t = times.filter((x) => x >= from && x <= to).sort((a, b) => a - b);
  let best: StallFigure = { ms: null, lastBefore: null, firstAfter: null, how: 'largest-gap' };
  for (let i = 1; i < t.length; i++) {
    const gap = t[i]! - t[i - 1]!;
    if (best.ms === null || gap > best.ms) best = { ms: gap, lastBefore: t[i - 1]!, firstAfter: t[i]!, how: 'largest-gap' };
  }
  return best;
}

/**
 * The stall around `switchAt`: from the last answer at or before it, the longest silence
 * between consecutive answers over the next `answersAfter` answers. With no reply in flight
 * that is last answer before → first answer after; a reply already on its way when the
 * source stopped (it arrives a few ms after the STOP, then nothing for seconds) does not
 * hide the stall that follows. With `switchAt` null, the largest gap inside [from, to]
 * instead. ms null when there is no answer before the switchover or none after it.
 */
export function stallAround(times: number[], switchAt: number | null, answersAfter = 50, from = -Infinity, to = Infinity): StallFigure {
  if (switchAt === null) return largestGap(times, from, to);
  const t = [...times].sort((a, b) => a - b);
  let i0 = -1;
  for (let i = 0; i < t.length && t[i]! <= switchAt; i++) i0 = i;
  const none: StallFigure = { ms: null, lastBefore: i0 < 0 ? null : t[i0]!, firstAfter: t[i0 + 1] ?? null, how: 'switchover' };
  if (i0 < 0 || i0 + 1 >= t.length) return none;
  const g = largestGap(t.slice(i0, i0 + 1 + answersAfter));
  return { ...g, how: 'switchover' };
}

/** Median of the non-null values (mean of the middle two for an even count), null when none. */
export function median(values: (number | null)[]): number | null {
  const v = values.filter((x): x is number => x !== null).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2;
}
