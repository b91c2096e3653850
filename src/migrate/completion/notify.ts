/**
 * The source's answer to a destination's completion request (RESOLVE), delivered until the
 * destination confirms it. Used by a running source migration and by a restarted sidecar's
 * recovery alike; the answer names its migration by id (docs/completion.md).
 */
import { TetherError } from '../../errors.ts';
import type { Message } from '../../peer/messages.ts';
import { PeerChannel } from '../../peer/channel.ts';
import { asPeerControl } from '../../peer/control.ts';
import type { PeerControl } from '../../peer/control.ts';
import type { Logger } from '../../util/log.ts';
import { errorFields, ignored } from '../../util/log.ts';
import { nowMs, sleep } from '../../util/time.ts';
import { resolveMessage } from './protocol.ts';

export interface NotifyOptions {
  psk: Buffer;
  /** The destination daemon's peer address (what `tether migrate --to` named). */
  to: { host: string; port: number };
  /** The migration answered (its `prepare`): the destination acts only if it holds this one. */
  migrationId: string;
  vm: string;
  outcome: 'completed' | 'rolled-back';
  epoch: number;
  log: Logger;
  /** The migration channel, tried first while it is open. */
  channel?: PeerChannel;
  /** Stop retrying after this long (default: never, for an answer of 'completed'). */
  giveUpAfterMs?: number;
}

/**
 * Delivers the source's answer to a completion request (RESOLVE) until the destination
 * confirms it (RESOLVED): first on the migration channel, then on channels opened to the
 * destination's peer port for this alone. Resolves 'confirmed', 'unknown' (the destination
 * has no such migration: it fenced, was restarted, or holds another migration of the VM
 * and said so with ERR_MIGRATION_ID_MISMATCH) or 'gave-up'.
 */
export async function notifyDestination(o: NotifyOptions): Promise<'confirmed' | 'unknown' | 'gave-up'> {
  const deadline = o.giveUpAfterMs === undefined ? Infinity : nowMs() + o.giveUpAfterMs;
  let ch = o.channel && !o.channel.closed ? o.channel : undefined;
  for (let attempt = 0; nowMs() < deadline; attempt++) {
    const own = ch === undefined;
    try {
      ch ??= await PeerChannel.connect(o.to.host, o.to.port, { psk: o.psk, connectTimeoutMs: 2000 });
      const a = await askResolved(ch, o.migrationId, resolveMessage(o.migrationId, o.vm, o.outcome, o.epoch), 3000, o.log);
      const f = { migrationId: o.migrationId, outcome: o.outcome, epoch: o.epoch };
      if (!a.known) o.log.error('the destination does not know this migration', { ...f, ...(a.code ? { code: a.code } : {}) });
      else o.log.info('destination confirmed the answer to its completion request', f);
      return a.known ? 'confirmed' : 'unknown';
    } catch (e) {
      if (attempt === 0 || attempt % 10 === 0) {
        o.log.warn('answer to the completion request not confirmed yet; retrying', {
          migrationId: o.migrationId,
          outcome: o.outcome,
          error: errorFields(e),
        });
      }
    } finally {
      if (own) ch?.close();
      ch = undefined;
    }
    await sleep(Math.min(250 * 2 ** attempt, 5000));
  }
  o.log.error('gave up telling the destination the migration outcome', { migrationId: o.migrationId, outcome: o.outcome });
  return 'gave-up';
}

/** Sends `msg` and waits for the RESOLVED of the same migration (a malformed one is not it). */
function askResolved(
  ch: PeerChannel,
  migrationId: string,
  msg: Message,
  timeoutMs: number,
  log: Logger,
): Promise<{ known: boolean; code?: string }> {
  return new Promise((resolve, reject) => {
    const done = (f: () => void) => {
      clearTimeout(timer);
      ch.off('message', onMessage);
      ch.off('close', onClose);
      f();
    };
    const timer = setTimeout(() => done(() => reject(new TetherError('ERR_PEER_TIMEOUT', 'no RESOLVED'))), timeoutMs);
    const onMessage = (m: Message) => {
      if (m.type !== 'control' || m.body.kind !== 'resolved') return;
      let c: PeerControl;
      try {
        c = asPeerControl(m.body);
      } catch {
        return; // a malformed RESOLVED is not the answer: wait for the right one (or the timeout)
      }
      if (c.kind !== 'resolved' || c.migrationId !== migrationId) return;
      done(() => resolve({ known: c.known, ...(c.code ? { code: c.code } : {}) }));
    };
    const onClose = () => done(() => reject(new TetherError('ERR_PEER_CLOSED', 'channel closed before RESOLVED')));
    ch.on('message', onMessage);
    ch.on('close', onClose);
    ch.start();
    // a send that fails closes the channel: onClose rejects
    ch.send(msg).catch(ignored(log, 'the channel closes and onClose rejects'));
  });
}
