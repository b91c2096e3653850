import { TetherError } from '../errors.ts';

/**
 * Fault injection for the netns harness and demos, from the daemon's
 * environment: TETHER_FAULTS="corrupt-epoch=5,delay-first-checkpoint-ms=60000".
 * Unknown names are refused so that a typo cannot silently test nothing.
 *   delay-first-checkpoint-ms=N  the destination waits N ms before checkpoint 1
 *   corrupt-epoch=K              the destination flips one byte inside checkpoint K's DEVSTATE frame
 *   truncate-epoch=K             the destination sends checkpoint K up to half of its DEVSTATE frame, then drops the channel
 *   journal-write-through        the destination's block-write journal writes through to the shared image (control tests)
 */
export interface Faults {
  delayFirstCheckpointMs?: number;
  corruptEpoch?: number;
  truncateEpoch?: number;
  journalWriteThrough?: boolean;
}

/** Switches without a value. */
const FLAGS: Record<string, 'journalWriteThrough'> = {
  'journal-write-through': 'journalWriteThrough',
};

const NAMES: Record<string, Exclude<keyof Faults, 'journalWriteThrough'>> = {
  'delay-first-checkpoint-ms': 'delayFirstCheckpointMs',
  'corrupt-epoch': 'corruptEpoch',
  'truncate-epoch': 'truncateEpoch',
};

export function parseFaults(spec: string | undefined): Faults {
  const out: Faults = {};
  if (!spec) return out;
  for (const part of spec
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)) {
    const [name, value] = part.split('=');
    const flag = FLAGS[name ?? ''];
    if (flag && value === undefined) {
      out[flag] = true;
      continue;
    }
    const key = NAMES[name ?? ''];
    const n = Number(value);
    if (!key || !Number.isInteger(n) || n < 0) {
      throw new TetherError(
        'ERR_FAULTS_INVALID',
        `TETHER_FAULTS: cannot parse '${part}' (known: ${[...Object.keys(NAMES), ...Object.keys(FLAGS)].join(', ')})`,
      );
    }
    out[key] = n;
  }
  return out;
}
