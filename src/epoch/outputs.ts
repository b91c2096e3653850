/**
 * The contract by which output commit (packet gate, block-write journal) joins the
 * destination's epoch barrier, and the disk extents an epoch's seal returns.
 */
import { TetherError } from '../errors.ts';

/** A disk write of the epoch: bytes, or (`zero: true`) a range that reads as zeroes. */
export type DiskExtent = DiskDataExtent | DiskZeroExtent;

export interface DiskDataExtent {
  /** Byte offset in the guest disk image. */
  offset: number;
  data: Buffer;
  zero?: undefined;
}

/** TRIM / WRITE_ZEROES: sent as DISKZERO (no payload), applied as zeroes (fallocate). */
export interface DiskZeroExtent {
  offset: number;
  length: number;
  zero: true;
  data?: undefined;
}

/** Bytes an extent covers in the image. */
export function extentLength(e: DiskExtent): number {
  return e.zero ? e.length : e.data.length;
}

/**
 * The hook by which output commit (packet gate, block-write journal) joins the
 * destination's epoch barrier. The epoch loop calls, in this order:
 *   quiesce()    (optional) before the barrier's first QMP command: QEMU's stop waits
 *                for every in-flight block request, so a write held back by a full
 *                journal must be admitted now, and a full packet gate must read its
 *                NIC socket again (QEMU's main loop blocks writing to it), or the
 *                barrier never completes
 *   unquiesce()  (optional) the barrier quiesce() prepared for is not coming (the loop
 *                ended: the final checkpoint was taken already): the bounds hold again
 *   seal(k)      at the barrier, VM paused: close epoch k, start epoch k+1, both
 *                within the call itself; resolves with the disk extents written in
 *                epoch k (sent inside checkpoint k), possibly after the VM runs again
 *   release(k)   on ACK(k): everything of epochs <= k may leave the host
 *   passThrough() after the final checkpoint of a completed migration
 *   discard()    when the destination fences itself: held outputs never leave
 */
export interface EpochOutputs {
  quiesce?(): void;
  unquiesce?(): void;
  seal(epoch: number): Promise<DiskExtent[]>;
  release(epoch: number): void;
  passThrough(): void;
  discard(): void;
}

/** A VM with no gated devices (the memcheck guest): nothing to hold. */
export const noOutputs: EpochOutputs = {
  seal: async () => [],
  release: () => {},
  passThrough: () => {},
  discard: () => {},
};

/**
 * Several devices behind one barrier (every NIC's gate and the disk journal):
 * each call reaches every part, in order; the sealed disk extents are concatenated.
 */
export function composeOutputs(parts: readonly EpochOutputs[]): EpochOutputs {
  if (parts.length === 0) return noOutputs;
  if (parts.length === 1) return parts[0]!;
  return {
    quiesce: () => parts.forEach((p) => p.quiesce?.()),
    unquiesce: () => parts.forEach((p) => p.unquiesce?.()),
    async seal(epoch) {
      // every part's epoch boundary is set now, in this call (the VM is stopped); their
      // extents may come later
      const sealing = parts.map((p) => p.seal(epoch));
      const all: DiskExtent[] = [];
      for (const s of await Promise.all(sealing)) all.push(...s);
      return all;
    },
    release: (epoch) => parts.forEach((p) => p.release(epoch)),
    passThrough: () => parts.forEach((p) => p.passThrough()),
    discard: () => parts.forEach((p) => p.discard()),
  };
}

/**
 * The destination's guard around its outputs: once discard() ran (the destination fenced
 * itself), nothing held may leave the host any more, so a late release(k) or passThrough()
 * throws ERR_OUTPUTS_DISCARDED instead of reaching the devices. After passThrough() the
 * migration is over and a discard() would drop frames of a guest that owns them: refused too.
 */
export function latchOutputs(inner: EpochOutputs): EpochOutputs & { readonly state: 'holding' | 'discarded' | 'passing' } {
  let state: 'holding' | 'discarded' | 'passing' = 'holding';
  const refusal = (what: string) => new TetherError('ERR_OUTPUTS_DISCARDED', `${what} after the outputs were ${state}`);
  const refuse = (what: string): never => {
    throw refusal(what);
  };
  return {
    get state() {
      return state;
    },
    quiesce: () => {
      if (state === 'holding') inner.quiesce?.();
    },
    unquiesce: () => {
      if (state === 'holding') inner.unquiesce?.();
    },
    seal: (epoch) => (state === 'holding' ? inner.seal(epoch) : Promise.reject(refusal(`seal(${epoch})`))),
    release(epoch) {
      if (state !== 'holding') refuse(`release(${epoch})`);
      inner.release(epoch);
    },
    passThrough() {
      if (state === 'discarded') refuse('passThrough()');
      state = 'passing';
      inner.passThrough();
    },
    discard() {
      if (state === 'passing') refuse('discard()');
      if (state === 'discarded') return;
      state = 'discarded';
      inner.discard();
    },
  };
}
