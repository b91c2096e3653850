import { randomBytes } from 'node:crypto';
import net from 'node:net';
import t from 'tap';
import { PeerChannel } from '../peer/channel.ts';
import { createLogger } from '../util/log.ts';
import { notifyDestination } from './source.ts';

const log = createLogger({ test: 'notify' }, 'error');

/**
 * A destination daemon's peer port on loopback: `plan` says, connection by connection,
 * whether it drops the answer with the channel or confirms it (known true/false).
 */
async function destination(psk: Buffer, plan: ('drop' | 'known' | 'unknown')[]) {
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
        else void ch.send({ type: 'control', body: { kind: 'resolved', known: step === 'known' } });
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
  const r = await notifyDestination({ psk, to: { host: '127.0.0.1', port: d.port }, vm: 'vm1', outcome: 'completed', epoch: 9, log });
  t.equal(r, 'confirmed');
  t.equal(d.connections(), 3, 'two lost answers, then a confirmed one');
  t.same(d.seen[2], { kind: 'resolve', vm: 'vm1', outcome: 'completed', epoch: 9 });
});

t.test('a destination that does not know the migration ends the retries', async (t) => {
  const psk = randomBytes(32);
  const d = await destination(psk, ['unknown']);
  t.teardown(d.close);
  const r = await notifyDestination({ psk, to: { host: '127.0.0.1', port: d.port }, vm: 'vm1', outcome: 'rolled-back', epoch: 3, log });
  t.equal(r, 'unknown');
});

t.test('unreachable destination: retried, then given up when a deadline is set', async (t) => {
  const psk = randomBytes(32);
  const d = await destination(psk, ['known']);
  d.close(); // nothing listens on that port any more
  const r = await notifyDestination({
    psk,
    to: { host: '127.0.0.1', port: d.port },
    vm: 'vm1',
    outcome: 'rolled-back',
    epoch: 3,
    log,
    giveUpAfterMs: 600,
  });
  t.equal(r, 'gave-up');
});
