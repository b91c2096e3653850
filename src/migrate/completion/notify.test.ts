import { randomBytes } from 'node:crypto';
import net from 'node:net';
import t from 'tap';
import { PeerChannel } from '../../peer/channel.ts';
import { newMigrationId } from '../../epoch/id.ts';
import { createLogger } from '../../util/log.ts';
import { notifyDestination } from './notify.ts';

const log = createLogger({ test: 'notify' }, 'error');

type Step = 'drop' | 'known' | 'unknown' | 'other-id';

/**
 * A destination daemon's peer port on loopback: `plan` says, connection by connection,
 * whether it drops the answer with the channel, confirms it (known true/false), or
 * answers with a RESOLVED naming another migration (then drops the channel).
 */
async function destination(psk: Buffer, plan: Step[]) {
  const seen: Record<string, unknown>[] = [];
  let n = 0;
  const srv = net.createServer((s) => {
    s.on('error', () => {});
    void PeerChannel.accept(s, { psk }).then((ch) => {
      const step = plan[Math.min(n++, plan.length - 1)];
      ch.on('message', (m) => {
        if (m.type !== 'control') return;
        seen.push(m.body);
        if (step === 'drop') ch.close();
        else if (step === 'other-id') {
          void ch
            .send({ type: 'control', body: { kind: 'resolved', migrationId: newMigrationId(), known: true } })
            .finally(() => setTimeout(() => ch.close(), 50));
        } else {
          const body = { kind: 'resolved', migrationId: m.body.migrationId, known: step === 'known' };
          void ch.send({ type: 'control', body: step === 'known' ? body : { ...body, code: 'ERR_MIGRATION_ID_MISMATCH' } });
        }
      });
      ch.start();
    });
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  return { port: (srv.address() as net.AddressInfo).port, seen, close: () => srv.close(), connections: () => n };
}

t.test('the answer is repeated on new channels until the destination confirms it', async (t) => {
  const psk = randomBytes(32);
  const d = await destination(psk, ['drop', 'drop', 'known']);
  t.teardown(d.close);
  const migrationId = newMigrationId();
  const to = { host: '127.0.0.1', port: d.port };
  const r = await notifyDestination({ psk, to, migrationId, vm: 'vm1', outcome: 'completed', epoch: 9, log });
  t.equal(r, 'confirmed');
  t.equal(d.connections(), 3, 'two lost answers, then a confirmed one');
  t.same(d.seen[2], { kind: 'resolve', migrationId, vm: 'vm1', outcome: 'completed', epoch: 9 }, 'the answer names its migration');
});

t.test('a RESOLVED naming another migration is not taken for the confirmation', async (t) => {
  const psk = randomBytes(32);
  const d = await destination(psk, ['other-id', 'known']);
  t.teardown(d.close);
  const migrationId = newMigrationId();
  const to = { host: '127.0.0.1', port: d.port };
  const r = await notifyDestination({ psk, to, migrationId, vm: 'vm1', outcome: 'rolled-back', epoch: 2, log });
  t.equal(r, 'confirmed');
  t.equal(d.connections(), 2, 'the answer was sent again after the foreign RESOLVED');
});

t.test('a destination that does not know the migration (or holds another one) ends the retries', async (t) => {
  const psk = randomBytes(32);
  const d = await destination(psk, ['unknown']);
  t.teardown(d.close);
  const to = { host: '127.0.0.1', port: d.port };
  const r = await notifyDestination({ psk, to, migrationId: newMigrationId(), vm: 'vm1', outcome: 'rolled-back', epoch: 3, log });
  t.equal(r, 'unknown');
});

t.test('unreachable destination: retried, then given up when a deadline is set', async (t) => {
  const psk = randomBytes(32);
  const d = await destination(psk, ['known']);
  d.close(); // nothing listens on that port any more
  const r = await notifyDestination({
    psk,
    to: { host: '127.0.0.1', port: d.port },
    migrationId: newMigrationId(),
    vm: 'vm1',
    outcome: 'rolled-back',
    epoch: 3,
    log,
    giveUpAfterMs: 600,
  });
  t.equal(r, 'gave-up');
});
