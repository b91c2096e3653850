/**
 * Streaming summary of a sample of non-negative numbers (checkpoint pauses, checkpoint
 * sizes): count, sum, min and max exactly, quantiles from a fixed log-bucket histogram.
 * Memory is constant whatever the count: a migration may take millions of checkpoints.
 *
 * Buckets: 0 has its own; v > 0 falls in bucket 1 + floor((log2 v - MIN_EXP) * SUB),
 * clamped to the range, so a quantile is off by at most a factor 2^(1/SUB) (about 2.2%)
 * for values in [2^MIN_EXP, 2^MAX_EXP) and clamped to [min, max] in any case.
 */
const SUB = 32;
const MIN_EXP = -20;
const MAX_EXP = 60;
const BUCKETS = 1 + (MAX_EXP - MIN_EXP) * SUB;

export class StreamingSummary {
  count = 0;
  sum = 0;
  min = Infinity;
  max = -Infinity;
  readonly #buckets = new Float64Array(BUCKETS);

  add(v: number): void {
    if (!Number.isFinite(v) || v < 0) return; // not a duration or a size: ignored
    this.count++;
    this.sum += v;
    if (v < this.min) this.min = v;
    if (v > this.max) this.max = v;
    this.#buckets[bucketOf(v)]!++;
  }

  /** Nearest-rank p-th percentile (0..100), within one bucket; NaN when empty. */
  quantile(p: number): number {
    if (this.count === 0) return NaN;
    const rank = Math.min(this.count, Math.max(1, Math.ceil((p / 100) * this.count)));
    if (rank === this.count) return this.max;
    let seen = 0;
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.#buckets[i]!;
      if (seen >= rank) return Math.min(this.max, Math.max(this.min, representative(i)));
    }
    return this.max;
  }
}

function bucketOf(v: number): number {
  if (v === 0) return 0;
  const i = 1 + Math.floor((Math.log2(v) - MIN_EXP) * SUB);
  return Math.min(BUCKETS - 1, Math.max(1, i));
}

/** The geometric middle of bucket i (> 0). */
function representative(i: number): number {
  if (i === 0) return 0;
  return 2 ** (MIN_EXP + (i - 1 + 0.5) / SUB);
}
