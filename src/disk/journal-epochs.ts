/**
 * The block-write journal's epochs (journal.ts): one ExtentMap per unreleased epoch, oldest
 * first. How they are rebuilt from a write-ahead log's replay, read through (a read the
 * epochs cover entirely), and written back into the image.
 */
import type { BlockDevice } from './block-device.ts';
import { ExtentMap } from './extent-map.ts';
import { LogKind, type Replay } from './journal-log.ts';

export interface Epoch {
  epoch: number;
  map: ExtentMap;
  sealed: boolean;
}

/**
 * The epochs a replay's records (epochs after the last acknowledged one) rebuild, in log
 * order: each sealed but the last, which is `nextEpoch` or later and stays open (the
 * guest's writes go on there). `held`: the bytes they hold.
 */
export function epochsFromReplay(replay: Replay, nextEpoch: number): { epochs: Epoch[]; held: number } {
  let first = nextEpoch;
  for (const r of replay.records) if (r.kind !== LogKind.Completed && r.epoch < first) first = r.epoch;
  const epochs: Epoch[] = [{ epoch: first, map: new ExtentMap(), sealed: false }];
  let held = 0;
  const openUpTo = (epoch: number): Epoch => {
    let open = epochs[epochs.length - 1]!;
    while (open.epoch < epoch) {
      open.sealed = true;
      open = { epoch: open.epoch + 1, map: new ExtentMap(), sealed: false };
      epochs.push(open);
    }
    return open;
  };
  for (const r of replay.records) {
    if (r.kind === LogKind.Completed) continue;
    const open = openUpTo(r.epoch);
    const before = open.map.bytes;
    if (r.kind === LogKind.Write) open.map.put(r.offset, r.data);
    else open.map.putZeroes(r.offset, r.length);
    held += open.map.bytes - before;
  }
  openUpTo(nextEpoch);
  return { epochs, held };
}

/**
 * The read of [offset, offset + length) from the layers alone (oldest first), when their
 * extents cover every byte of it; else undefined (the image must be read under them).
 */
export function coveredRead(layers: readonly ExtentMap[], offset: number, length: number): Buffer | undefined {
  if (length === 0 || layers.length === 0) return undefined;
  const end = offset + length;
  const spans: [number, number][] = [];
  for (const m of layers) m.spans(offset, end, spans);
  if (spans.length === 0) return undefined;
  spans.sort((a, b) => a[0] - b[0]);
  let reached = offset;
  for (const [from, to] of spans) {
    if (from > reached) return undefined;
    if (to > reached) reached = to;
  }
  if (reached < end) return undefined;
  const buf = Buffer.allocUnsafe(length);
  for (const m of layers) m.overlay(offset, buf);
  return buf;
}

/**
 * Writes every extent of `epochs` into the image, oldest epoch first (zero extents as
 * WRITE_ZEROES), then fdatasync and drops the image's cached pages. `afterFirst` (the
 * journal's writeBackHold hook) is awaited once the first extent is in the image.
 */
export async function writeEpochsBack(image: BlockDevice, epochs: readonly Epoch[], afterFirst?: () => Promise<void>): Promise<number> {
  let bytes = 0;
  let extents = 0;
  for (const e of epochs) {
    for (const x of e.map.extents()) {
      if (x.data) await image.write(x.offset, x.data);
      else await image.writeZeroes(x.offset, x.length);
      bytes += x.length;
      if (++extents === 1 && afterFirst) await afterFirst();
    }
  }
  if (bytes > 0) {
    await image.flush();
    // Durable on the storage now: no clean copy of it stays in this host's cache.
    image.dropCache?.();
  }
  return bytes;
}

/** The journal keeps what it is given; the caller (the NBD server) may reuse its buffer. */
export function copy(data: Buffer): Buffer {
  const b = Buffer.allocUnsafeSlow(data.length);
  data.copy(b);
  return b;
}
