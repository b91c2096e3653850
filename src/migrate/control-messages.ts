import { isValidName } from '../config/load.ts';
import { TetherError } from '../errors.ts';
import { DIGEST_RE } from '../vm/device-model.ts';

/**
 * CONTROL bodies on the peer channel (JSON). `kind` discriminates.
 *   S -> D  prepare        {vm, deviceModel,       start an incoming QEMU for the VM named `vm`, built
 *                           sendConfiguration,     from D's own <vmConfigDir>/<vm>.yaml, whose device-model
 *                           failoverTimeoutMs}     digest (sha256 hex) must equal `deviceModel`; expecting the
 *                                                  stream's configuration section or not; D's fenceTimeoutMs
 *                                                  must be below S's failoverTimeoutMs. D answers ready, or
 *                                                  ABORT with ERR_PEER_UNKNOWN_VM / ERR_PEER_DEVICE_MODEL /
 *                                                  ERR_PEER_TIMEOUTS / ERR_PEER_VM_BUSY before starting anything
 *   D -> S  ready          {uri}                   where S's QEMU sends the migration stream
 *   S -> D  hashes-done    {pages}                 all HASHES sent (checkpoint 0 baseline)
 *   D -> S  epoch-stats    {epoch, pauseMs, ...}   figures of checkpoint `epoch`, after its COMMIT
 *   D -> S  done           {finalEpoch}            post-copy completed and the final checkpoint is acked
 */
export type PeerControl =
  | { kind: 'prepare'; vm: string; deviceModel: string; sendConfiguration: boolean; failoverTimeoutMs: number }
  | { kind: 'ready'; uri: string }
  | { kind: 'hashes-done'; pages: number }
  | {
      kind: 'epoch-stats';
      epoch: number;
      pauseMs: number;
      pages: number;
      bytes: number;
      collectMs: number;
      saveMs: number;
      tracker: string;
    }
  | { kind: 'done'; finalEpoch: number };

export function asPeerControl(body: Record<string, unknown>): PeerControl {
  const kind = body.kind;
  const num = (k: string) => {
    if (typeof body[k] !== 'number' || !Number.isFinite(body[k])) {
      throw new TetherError('ERR_PEER_CONTROL', `control ${String(kind)}: field ${k} must be a number`);
    }
  };
  switch (kind) {
    case 'prepare':
      // The name becomes a file name on D: only a valid VM name, never a path.
      if (!isValidName(body.vm)) throw new TetherError('ERR_PEER_CONTROL', 'prepare: vm must be a VM name');
      if (typeof body.deviceModel !== 'string' || !DIGEST_RE.test(body.deviceModel)) {
        throw new TetherError('ERR_PEER_CONTROL', 'prepare: deviceModel must be a sha256 hex digest');
      }
      num('failoverTimeoutMs');
      if (typeof body.sendConfiguration !== 'boolean') throw new TetherError('ERR_PEER_CONTROL', 'prepare: sendConfiguration missing');
      break;
    case 'ready':
      if (typeof body.uri !== 'string') throw new TetherError('ERR_PEER_CONTROL', 'ready: uri missing');
      break;
    case 'hashes-done':
      num('pages');
      break;
    case 'epoch-stats':
      for (const k of ['epoch', 'pauseMs', 'pages', 'bytes', 'collectMs', 'saveMs']) num(k);
      break;
    case 'done':
      num('finalEpoch');
      break;
    default:
      throw new TetherError('ERR_PEER_CONTROL', `unknown control kind ${String(kind)}`);
  }
  return body as unknown as PeerControl;
}
