/**
 * The hook by which output commit (packet gate, block-write journal) joins the
 * destination's epoch barrier. The epoch loop calls, in this order:
 *   quiesce()    (optional) just before it stops the VM: QEMU's stop waits for
 *                every in-flight block request, so a write held back by a full
 *                journal must be admitted now or the barrier never completes
 *   seal(k)      at the barrier, VM paused: close epoch k, start epoch k+1;
 *                returns the disk extents written in epoch k (sent inside checkpoint k)
 *   release(k)   on ACK(k): everything of epochs <= k may leave the host
 *   passThrough() after the final checkpoint of a completed migration
 *   discard()    when the destination fences itself: held outputs never leave
 */
export interface DiskExtent {
  offset: number;
  data: Buffer;
}

export interface EpochOutputs {
  quiesce?(): void;
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
    async seal(epoch) {
      const all: DiskExtent[] = [];
      for (const p of parts) all.push(...(await p.seal(epoch)));
      return all;
    },
    release: (epoch) => parts.forEach((p) => p.release(epoch)),
    passThrough: () => parts.forEach((p) => p.passThrough()),
    discard: () => parts.forEach((p) => p.discard()),
  };
}
