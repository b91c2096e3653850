/**
 * Sends one source answer (RESOLVE) with notifyDestination, the production sender, from
 * inside a host's namespace (see Cluster.resolveSender):
 *   node --import tsx lab/send-resolve.ts <host.yaml> <peer host:port> <json body>
 * body: {migrationId, vm, outcome, epoch}. Prints "ready" once loaded, sends when stdin
 * says "go", prints notifyDestination's outcome (confirmed | unknown | gave-up) and exits.
 * Stdin closed without "go": exits 2 without sending.
 */
import { loadHostConfig } from '../src/config/load.ts';
import { notifyDestination } from '../src/migrate/completion/notify.ts';
import { createLogger } from '../src/util/log.ts';

const [config, to, json] = process.argv.slice(2);
const host = loadHostConfig(config!);
const m = /^(.+):(\d+)$/.exec(to!)!;
const body = JSON.parse(json!) as { migrationId: string; vm: string; outcome: 'completed' | 'rolled-back'; epoch: number };
process.stdout.write('ready\n');
let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => (input += d));
await new Promise((r) => process.stdin.on('end', r));
if (input.trim() !== 'go') process.exit(2);
const r = await notifyDestination({
  psk: host.peer.key,
  to: { host: m[1]!, port: Number(m[2]) },
  ...body,
  log: createLogger({ tool: 'send-resolve' }, 'error'),
  giveUpAfterMs: 20_000,
});
process.stdout.write(`${r}\n`);
