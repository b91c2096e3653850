import { isValidName } from '../config/load.ts';
import { isErrorCode, TetherError } from '../errors.ts';
import type { ErrorCode } from '../errors.ts';
import { isMigrationId } from '../epoch/id.ts';
import { MAX_CHECKPOINT_WINDOW } from '../epoch/limits.ts';

/**
 * CONTROL bodies on the peer channel (JSON). `kind` discriminates. `migrationId` is always
 * a MIGRATION_ID_RE string; a body with a missing or malformed one is refused (ERR_PEER_CONTROL).
 *   S -> D  prepare        {migrationId, vm,       start an incoming QEMU for the VM named `vm`, built
 *                           deviceModel,           from D's own <vmConfigDir>/<vm>.yaml, whose device-model
 *                           sendConfiguration,     digest (sha256 hex) must equal `deviceModel`; expecting the
 *                           failoverTimeoutMs,     stream's configuration section or not; D's fenceTimeoutMs
 *                           window?}               must be below S's failoverTimeoutMs; D keeps at most
 *                                                  `window` checkpoints unacknowledged (absent: 1, an integer
 *                                                  in [1, 16] otherwise). D answers ready, or
 *                                                  ABORT with ERR_PEER_UNKNOWN_VM / ERR_PEER_DEVICE_MODEL /
 *                                                  ERR_PEER_TIMEOUTS / ERR_PEER_VM_BUSY before starting anything
 *   D -> S  ready          {uri}                   where S's QEMU sends the migration stream
 *   S -> D  hashes-done    {pages}                 all HASHES sent (checkpoint 0 baseline)
 *   D -> S  epoch-stats    {epoch, pauseMs, ...}   figures of checkpoint `epoch`, after its COMMIT
 *   D -> S  complete       {migrationId,           post-copy completed and the final checkpoint is acked:
 *                           finalEpoch}            D asks to own the VM (completion handshake, docs/completion.md)
 *   S -> D  resolve        {migrationId, vm,       S's answer: 'completed' once completed.json is durable
 *                           outcome, epoch}        (epoch = final epoch), or 'rolled-back' (epoch = the one
 *                                                  S resumed from). On the migration channel or, when that is
 *                                                  gone, on a channel S opens to D's peer port for it alone.
 *                                                  D acts on it only if migrationId is the migration it holds
 *   D -> S  resolved       {migrationId, known,    D acted on the answer (known=false: D has no such migration;
 *                           code?}                 code ERR_MIGRATION_ID_MISMATCH: D holds another one of the VM)
 *   S -> D  hold           {migrationId}           S decided to roll back and checks it can restore before it
 *                                                  fences D: no ACK comes any more; D keeps its VM and holds
 *                                                  every output, never fences by kill on silence or an unacked
 *                                                  checkpoint (it pauses), and waits for ABORT / resolve
 *                                                  rolled-back (fence) or resolve completed (S gave the rollback
 *                                                  up, recorded durably: the VM continues on D). docs/design.md
 */
/** The form of a device-model digest (deviceModelDigest in src/vm/device-model.ts): sha256, lowercase hex. */
const DIGEST_RE = /^[0-9a-f]{64}$/;

export type PeerControl =
  | {
      kind: 'prepare';
      migrationId: string;
      vm: string;
      deviceModel: string;
      sendConfiguration: boolean;
      failoverTimeoutMs: number;
      window?: number;
    }
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
  | { kind: 'complete'; migrationId: string; finalEpoch: number }
  | { kind: 'resolve'; migrationId: string; vm: string; outcome: 'completed' | 'rolled-back'; epoch: number }
  | { kind: 'resolved'; migrationId: string; known: boolean; code?: ErrorCode }
  | { kind: 'hold'; migrationId: string };

export function asPeerControl(body: Record<string, unknown>): PeerControl {
  const kind = body.kind;
  const num = (k: string) => {
    if (typeof body[k] !== 'number' || !Number.isFinite(body[k])) {
      throw new TetherError('ERR_PEER_CONTROL', `control ${String(kind)}: field ${k} must be a number`);
    }
  };
  const id = () => {
    if (!isMigrationId(body.migrationId)) {
      throw new TetherError('ERR_PEER_CONTROL', `control ${String(kind)}: migrationId must be a lower-case UUID (36 characters)`);
    }
  };
  switch (kind) {
    case 'prepare':
      id();
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
      id();
      num('finalEpoch');
      break;
    case 'resolve':
      id();
      if (!isValidName(body.vm)) throw new TetherError('ERR_PEER_CONTROL', 'resolve: vm must be a VM name');
      if (body.outcome !== 'completed' && body.outcome !== 'rolled-back') {
        throw new TetherError('ERR_PEER_CONTROL', 'resolve: outcome must be completed or rolled-back');
      }
      num('epoch');
      break;
    case 'hold':
      id();
      break;
    case 'resolved':
      id();
      if (typeof body.known !== 'boolean') throw new TetherError('ERR_PEER_CONTROL', 'resolved: known missing');
      if (body.code !== undefined && !(typeof body.code === 'string' && isErrorCode(body.code))) {
        throw new TetherError('ERR_PEER_CONTROL', 'resolved: code must be a catalogued error code');
      }
      break;
    default:
      throw new TetherError('ERR_PEER_CONTROL', `unknown control kind ${String(kind)}`);
  }
  return body as unknown as PeerControl;
}
