import { isValidName } from '../config/load.ts';
import { TetherError } from '../errors.ts';
import { DIGEST_RE } from '../vm/device-model.ts';
import { MAX_CHECKPOINT_WINDOW } from '../migrate/window.ts';

/**
 * CONTROL bodies on the peer channel (JSON). `kind` discriminates.
 *   S -> D  prepare        {vm, deviceModel,       start an incoming QEMU for the VM named `vm`, built
 *                           sendConfiguration,     from D's own <vmConfigDir>/<vm>.yaml, whose device-model
 *                           failoverTimeoutMs,     digest (sha256 hex) must equal `deviceModel`; expecting the
 *                           window?}               stream's configuration section or not; D's fenceTimeoutMs
 *                                                  must be below S's failoverTimeoutMs; D keeps at most
 *                                                  `window` checkpoints unacknowledged (absent: 1, an integer
 *                                                  in [1, 16] otherwise). D answers ready, or
 *                                                  ABORT with ERR_PEER_UNKNOWN_VM / ERR_PEER_DEVICE_MODEL /
 *                                                  ERR_PEER_TIMEOUTS / ERR_PEER_VM_BUSY before starting anything
 *   D -> S  ready          {uri}                   where S's QEMU sends the migration stream
 *   S -> D  hashes-done    {pages}                 all HASHES sent (checkpoint 0 baseline)
 *   D -> S  epoch-stats    {epoch, pauseMs, ...}   figures of checkpoint `epoch`, after its COMMIT
 *   D -> S  complete       {finalEpoch}            post-copy completed and the final checkpoint is acked:
 *                                                  D asks to own the VM (completion handshake, docs/completion.md)
 *   S -> D  resolve        {vm, outcome, epoch}    S's answer: 'completed' once completed.json is durable
 *                                                  (epoch = final epoch), or 'rolled-back' (epoch = the one
 *                                                  S resumed from). On the migration channel or, when that is
 *                                                  gone, on a channel S opens to D's peer port for it alone.
 *   D -> S  resolved       {known}                 D acted on the answer (known=false: D has no such migration)
 */
export type PeerControl =
  | { kind: 'prepare'; vm: string; deviceModel: string; sendConfiguration: boolean; failoverTimeoutMs: number; window?: number }
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
  | { kind: 'complete'; finalEpoch: number }
  | { kind: 'resolve'; vm: string; outcome: 'completed' | 'rolled-back'; epoch: number }
  | { kind: 'resolved'; known: boolean };

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
      if (
        body.window !== undefined &&
        !(Number.isSafeInteger(body.window) && (body.window as number) >= 1 && (body.window as number) <= 16)
      ) {
        throw new TetherError('ERR_PEER_CONTROL', `prepare: window must be an integer in [1, ${MAX_CHECKPOINT_WINDOW}]`);
      }
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
    case 'complete':
      num('finalEpoch');
      break;
    case 'resolve':
      if (typeof body.vm !== 'string') throw new TetherError('ERR_PEER_CONTROL', 'resolve: vm missing');
      if (body.outcome !== 'completed' && body.outcome !== 'rolled-back') {
        throw new TetherError('ERR_PEER_CONTROL', 'resolve: outcome must be completed or rolled-back');
      }
      num('epoch');
      break;
    case 'resolved':
      if (typeof body.known !== 'boolean') throw new TetherError('ERR_PEER_CONTROL', 'resolved: known missing');
      break;
    default:
      throw new TetherError('ERR_PEER_CONTROL', `unknown control kind ${String(kind)}`);
  }
  return body as unknown as PeerControl;
}
