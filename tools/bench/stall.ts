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
 * The stall around `switchAt`: last answer at or before it → first answer after it. With
 * `switchAt` null, the largest gap inside [from, to] instead.
 */
export function stallAround(times: number[], switchAt: number | null, from = -Infinity, to = Infinity): StallFigure {
  if (switchAt === null) return largestGap(times, from, to);
  let lastBefore: number | null = null;
  let firstAfter: number | null = null;
  for (const x of times) {
    if (x <= switchAt) {
      if (lastBefore === null || x > lastBefore) lastBefore = x;
    } else if (firstAfter === null || x < firstAfter) firstAfter = x;
  }
  return {
    ms: lastBefore === null || firstAfter === null ? null : firstAfter - lastBefore,
    lastBefore,
    firstAfter,
    how: 'switchover',
  };
}

/** Median of the non-null values (mean of the middle two for an even count), null when none. */
export function median(values: (number | null)[]): number | null {
  const v = values.filter((x): x is number => x !== null).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2;
}
