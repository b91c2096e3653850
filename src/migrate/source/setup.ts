/**
 * Setup: everything before QEMU is asked to migrate. The RAM file is reserved, old
 * checkpoints go, the migration marker is written, the destination's peer is reached and
 * asked to `prepare`, and its answer (the migration URI) is checked. Ends in 'prepared'; the
 * failures that leave nothing changed anywhere end here too: unreached and refused.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import type { Message } from '../../peer/messages.ts';
import { TetherError } from '../../errors.ts';
import { PeerChannel } from '../../peer/channel.ts';
import { errorFields, ignored } from '../../util/log.ts';
import { sleep } from '../../util/time.ts';
import { deviceModelDigest } from '../../vm/device-model.ts';
import { HotStandby } from '../standby.ts';
import { checkMigrationUri } from '../uri.ts';
import type { SourceRun } from './context.ts';
import { rollback } from './rollback.ts';

/**
 * Runs setup; returns the checked migration URI, or null when the migration ended during it
 * (refused, unreached, or decided otherwise).
 */
export async function setup(run: SourceRun, onMessage: (m: Message) => void): Promise<string | null> {
  const vm = run.vm;
  const qemu = vm.qemu;
  if (!qemu || qemu.hasExited) throw new TetherError('ERR_VM_NOT_RUNNING', `VM ${vm.name} has no running QEMU`);
  // Before switchover the VM dies with it; in post-copy the destination can no
  // longer fetch the pages it lacks. Either way: resume from the last checkpoint.
  void qemu.exited.then(() => {
    if (run.live) void rollback(run, 'source-qemu-exited', new TetherError('ERR_SOURCE_QEMU_EXITED', 'source QEMU exited'));
  });
  // Every page of the RAM file allocated before anything starts: a checkpoint's page writes
  // then never need room on the tmpfs, so a tmpfs that runs full (another VM growing) cannot
  // half-apply a checkpoint. Refused here, with nothing changed, when the room is not there.
  try {
    await allocateRamFile(vm.ramFile, vm.ramBytes);
  } catch (e) {
    await refused(
      run,
      new TetherError('ERR_CKPT_RAM_RESERVE', `cannot allocate ${vm.ramFile} (${vm.ramBytes} bytes): ${(e as Error).message}`),
    );
    return null;
  }
  // Old checkpoints go before the marker appears: a sidecar restarted in between must
  // never find a marker next to a previous migration's applied record.
  await fs.rm(vm.checkpointDir, { recursive: true, force: true });
  await vm.setMigrationMarker({
    role: 'source',
    migrationId: run.id,
    qemuPid: qemu.pid,
    peer: `${run.opts.to.host}:${run.opts.to.port}`,
    startedAt: new Date().toISOString(),
  });
  await fs.mkdir(vm.checkpointDir, { recursive: true, mode: 0o700 });

  const ch = await connect(run, onMessage);
  if (!ch) return null;
  await sendPrepare(run, ch);
  // The hot standby starts while D starts its QEMU, so that neither QEMU's start (~170 ms
  // of CPU) competes with the switchover; it stays idle until a rollback.
  if (vm.config.migration.hotStandby && run.live) run.standby = HotStandby.start(vm);
  const ready = await run.waitControl('ready', 60_000);
  if (ready.kind !== 'ready') throw new TetherError('ERR_PEER_PROTOCOL', `expected ready, got ${ready.kind}`);
  // Never execute what the peer names: only tcp:<the address this channel reached>:<port>,
  // rebuilt here (uri.ts). Anything else is refused before any QMP command.
  let uri: string;
  try {
    uri = checkMigrationUri(ready.uri, ch.remoteAddress);
  } catch (e) {
    await refused(run, e as TetherError, { tellDestination: true });
    return null;
  }
  run.log.info('destination ready', { uri });
  run.progress({ phase: 'precopy', destination: uri });
  return uri;
}

/** The peer channel to the destination, its events wired; null when no tether peer answered (unreached). */
async function connect(run: SourceRun, onMessage: (m: Message) => void): Promise<PeerChannel | null> {
  let ch: PeerChannel;
  try {
    ch = await PeerChannel.connect(run.opts.to.host, run.opts.to.port, { psk: run.opts.host.peer.key });
  } catch (e) {
    await unreached(run, e);
    return null;
  }
  run.channel = ch;
  ch.on('message', onMessage);
  ch.on('close', (err) => {
    if (!run.live) run.destinationGone = true;
    else void rollback(run, 'peer-channel-closed', err);
  });
  ch.start();
  if (ch.closed) throw new TetherError('ERR_PEER_CLOSED', 'peer closed the channel right after the handshake');
  return ch;
}

/** `prepare`: D runs QEMU from its own config of this VM; only the name and the device-model digest travel. */
async function sendPrepare(run: SourceRun, ch: PeerChannel): Promise<void> {
  const vm = run.vm;
  await ch.send({
    type: 'control',
    body: {
      kind: 'prepare',
      migrationId: run.id,
      vm: vm.name,
      deviceModel: deviceModelDigest(vm.config),
      sendConfiguration: vm.sendConfiguration,
      failoverTimeoutMs: vm.config.checkpoint.failoverTimeoutMs,
      window: vm.config.checkpoint.window,
    },
  });
}

/** No tether peer answered: undo the marker and report the cause as an error. */
async function unreached(run: SourceRun, e: unknown): Promise<void> {
  if (!run.live) return;
  run.stopTimers();
  run.log.warn('destination not reached: nothing was migrated', { error: errorFields(e) });
  run.phase.to('unreached');
  await forgetMigration(run);
  run.opts.metrics?.migrations.inc({ role: 'source', outcome: 'unreached' });
  run.result.reject(e);
}

/**
 * The destination refused `prepare`, or this side refused the destination's answer to it
 * (`tellDestination`: a migration URI it will not use; D is told with an ABORT naming the
 * code, so it does not wait for a stream): QEMU was never asked to migrate, so the VM
 * simply goes on running here; the refusal (a typed error) is the result.
 */
export async function refused(run: SourceRun, err: TetherError, opts: { tellDestination?: boolean } = {}): Promise<void> {
  if (!run.live) return;
  run.stopTimers();
  run.log.warn(
    opts.tellDestination ? "destination's answer refused; nothing was started" : 'destination refused the migration; nothing was started',
    { error: errorFields(err) },
  );
  run.phase.to('refused', { code: err.code });
  await run.standby?.discard();
  const ch = run.channel;
  if (opts.tellDestination && ch && !ch.closed) {
    const abort = { type: 'abort' as const, code: err.code, reason: err.message };
    await Promise.race([ch.send(abort).catch(ignored(run.log, 'a lost ABORT: the channel closes next')), sleep(200)]);
  }
  ch?.close();
  run.releaseWaiters();
  await forgetMigration(run);
  run.opts.metrics?.migrations.inc({ role: 'source', outcome: 'refused' });
  run.result.reject(err);
}

/** Nothing was migrated: the VM runs here as before, without marker or checkpoints. */
async function forgetMigration(run: SourceRun): Promise<void> {
  run.vm.place = 'running';
  await run.vm.setMigrationMarker(null).catch(ignored(run.log, 'a marker left behind is resolved at the next start'));
  await fs
    .rm(run.vm.checkpointDir, { recursive: true, force: true })
    .catch(ignored(run.log, 'the next migration removes old checkpoints first'));
}

/**
 * fallocate(2) of the whole file (mode 0: holes become allocated zero pages, data is kept), with
 * util-linux's fallocate: Node has no binding for it. A fixed system binary and this host's own
 * path, nothing a peer names.
 */
function allocateRamFile(file: string, bytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('fallocate', ['-l', String(bytes), file], { timeout: 120_000 }, (err, _out, stderr) => {
      if (err) reject(new TetherError('ERR_CKPT_RAM_RESERVE', String(stderr).trim() || err.message));
      else resolve();
    });
  });
}
