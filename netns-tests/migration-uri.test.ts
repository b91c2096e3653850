/**
 * The source never executes what the destination names. A destination that holds the key
 * (evil-peer.ts, in place of D's daemon) answers `prepare` with URIs the source's real QEMU
 * would act on: run a command, connect to a unix socket, a TCP port with QEMU socket
 * options, another host, a host name, a malformed URI. Traps show what QEMU would have done
 * (a file the command creates, connections to a unix socket and a TCP port). Each is
 * refused with ERR_PEER_MIGRATION_URI; the guest runs on untouched; the control, the one
 * accepted form, does reach QEMU (its connection springs the TCP trap).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { fileSize, waitFor } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { ROOT } from '../lab/topology.ts';
import { bootCluster } from './scenarios.ts';

const TRAP_PORT = 49155;

t.test('a destination naming exec:, unix:, another host or a malformed URI gets nothing run', async (t) => {
  const c = await bootCluster(t, { vm: { maxBandwidth: 0 } });
  const before = await c.status(c.src);
  await c.killDaemon(c.dst);
  const trapSock = path.join(c.dir, 'trap.sock');
  const pwned = path.join(c.dir, 'pwned');
  const evil = spawn(
    'ip',
    [
      'netns',
      'exec',
      c.dst.ns,
      process.execPath,
      '--import',
      'tsx',
      path.join(ROOT, 'netns-tests', 'evil-peer.ts'),
      c.dst.config,
      trapSock,
      String(TRAP_PORT),
    ],
    { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] },
  );
  t.teardown(() => evil.kill('SIGKILL'));
  const events: Record<string, any>[] = [];
  let out = '';
  let err = '';
  evil.stdout.on('data', (d: Buffer) => {
    out += d.toString();
    for (let nl = out.indexOf('\n'); nl !== -1; nl = out.indexOf('\n')) {
      events.push(JSON.parse(out.slice(0, nl)) as Record<string, any>);
      out = out.slice(nl + 1);
    }
  });
  evil.stderr.on('data', (d: Buffer) => (err += d.toString()));
  await waitFor(() => events.some((e) => e.ready) || evil.exitCode !== null, 'the evil peer listening', 60_000);
  t.ok(
    events.some((e) => e.ready),
    `evil peer up: ${err.slice(-1000)}`,
  );
  const setUri = async (uri: string) => {
    const n = events.length;
    evil.stdin.write(uri + '\n');
    await waitFor(() => events.slice(n).some((e) => e.uri === uri), 'the evil peer took the URI', 10_000);
  };

  const d = c.dst.addr;
  const cases: Array<[string, string]> = [
    [`exec:touch ${pwned}`, 'exec'],
    [`unix:${trapSock}`, 'unix'],
    [`tcp:${d}:${TRAP_PORT},to=${TRAP_PORT + 1}`, 'QEMU socket options'],
    [`tcp:${c.src.addr}:${TRAP_PORT}`, 'another host'],
    [`tcp:localhost:${TRAP_PORT}`, 'a host name'],
    [`TCP:${d}:${TRAP_PORT}`, 'upper-case scheme'],
    [`tcp:${d}:0`, 'port 0'],
    [`tcp:${d}`, 'no port'],
  ];
  for (const [uri, what] of cases) {
    await setUri(uri);
    const n = events.length;
    const mig = await c.migrate();
    t.equal(mig.code, 1, `${what}: migrate exits 1`);
    t.match(mig.stderr, 'ERR_PEER_MIGRATION_URI', `${what}: the CLI shows ERR_PEER_MIGRATION_URI`);
    const s = await c.status(c.src);
    t.equal(s.state, 'running', `${what}: the VM still runs on the source`);
    t.equal(s.pid, before.pid, `${what}: the same source QEMU`);
    t.equal(s.migration, null, `${what}: no migration in progress`);
    t.notOk(fs.existsSync(path.join(c.src.stateDir, c.vmName, 'migration.json')), `${what}: no marker left`);
    await waitFor(() => events.slice(n).some((e) => e.abort), `${what}: the ABORT`, 10_000);
    t.match(
      events.slice(n).find((e) => e.abort),
      { abort: { code: 'ERR_PEER_MIGRATION_URI' } },
      `${what}: the destination is told`,
    );
  }
  t.notOk(fs.existsSync(pwned), 'the command was never run');
  t.same(
    events.filter((e) => e.trap),
    [],
    'QEMU never connected to the unix socket or the TCP port',
  );
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 1, 'after the refusals');
  t.same(rep.corrupt, [], 'the guest never noticed: no CORRUPT');

  // The control: the accepted form does reach QEMU, which connects to it (the trap answers
  // by closing, so QEMU's migration fails and the source keeps the VM).
  await setUri(`tcp:${d}:${TRAP_PORT}`);
  const mig = await c.migrate();
  await waitFor(() => events.some((e) => e.trap === 'tcp'), 'the source QEMU connecting to tcp:<its address>:<port>', 10_000);
  t.pass('with tcp:<its address>:<port> the source QEMU did connect');
  t.not(mig.code, 0, 'that migration did not complete');
  await waitFor(async () => (await c.status(c.src)).state === 'running', 'the VM running on the source again');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT on the source');
});
