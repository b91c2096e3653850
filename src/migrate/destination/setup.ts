/**
 * The destination's set-up, before the VM runs here: the disk served through a journal (so no
 * write of the guest here reaches the shared image before its checkpoint is acknowledged), the
 * incoming QEMU with its guard and migration marker, the NICs (the daemon's onQemuStarted),
 * post-copy, the stream's TLS credentials and the listening port. Ends with READY sent to the
 * source (its QEMU may connect from then on).
 */
import fs from 'node:fs/promises';
import { BlockJournal } from '../../disk/journal.ts';
import { JournalLog, journalLogPath } from '../../disk/journal-log.ts';
import { composeOutputs, latchOutputs, noOutputs } from '../../epoch/outputs.ts';
import { TetherError } from '../../errors.ts';
import { migrateIncoming, migrateSetCapabilities } from '../../qemu/commands.ts';
import { errorFields, ignored } from '../../util/log.ts';
import { QemuGuard } from '../../vm/guard.ts';
import { StreamTls, streamPsk } from '../stream-tls.ts';
import { migrationUri } from '../uri.ts';
import type { DestContext } from './context.ts';
import { fence } from './fence.ts';

/** Set up everything the incoming stream needs, then tell the source the port (READY). */
export async function setUp(ctx: DestContext): Promise<void> {
  await journalDisk(ctx);
  await startQemu(ctx);
  await migrateSetCapabilities(ctx.vm.qemu!.qmp, [{ capability: 'postcopy-ram', state: true }]);
  await setUpTls(ctx);
  const uri = await listen(ctx);
  ctx.phase.to('incoming', { uri });
  await ctx.ch.send({ type: 'control', body: { kind: 'ready', uri } });
}

/**
 * Before this host's QEMU exists: serve the VM's disk through a journal in
 * journal mode, so no write the guest makes here reaches the shared image
 * before the checkpoint that carries it is acknowledged (the source writes the
 * image until completion). The journal joins the barrier next to the gates.
 */
async function journalDisk(ctx: DestContext): Promise<void> {
  const { vm, faults } = ctx;
  const disk = vm.config.disk;
  if (!disk) return;
  let journal: BlockJournal | undefined;
  const writeThrough = faults.journalWriteThrough ?? false;
  // The write-ahead log: a restarted sidecar finds this migration's journal in it.
  const wal = writeThrough
    ? undefined
    : await JournalLog.create(
        journalLogPath(vm.journalDir, vm.name, ctx.id),
        { vm: vm.name, migrationId: ctx.id, size: (await fs.stat(disk.image)).size },
        // a segment of the log is deleted once every epoch it holds is acknowledged
        { segmentBytes: disk.journalSegmentBytes },
      );
  const writeBackHold = faults.holdWriteback || faults.holdWritebackEarly ? { writeBackHold: () => holdWriteBack(ctx) } : {};
  vm.diskDevice = (image) => {
    journal = new BlockJournal(image, {
      maxBytes: disk.journalMaxBytes,
      writeThrough,
      log: ctx.log,
      ...(wal ? { wal } : {}),
      ...writeBackHold,
    });
    journal.journal(1);
    return journal;
  };
  try {
    await vm.startDisk();
  } catch (e) {
    await wal?.remove();
    throw e;
  }
  if (!journal) {
    await wal?.remove();
    throw new TetherError('ERR_JOURNAL_STATE', 'the disk was already served without a journal');
  }
  ctx.journal = journal;
  // before anything reached the outputs: latch the composition of the gates and the journal
  ctx.outputs = latchOutputs(composeOutputs([ctx.opts.outputs ?? noOutputs, journal]));
}

/** Fault injection (hold-writeback): the journal's write-back stops for good after its first extent. */
function holdWriteBack(ctx: DestContext): Promise<void> {
  ctx.writeBackHeld.resolve();
  return new Promise<void>(() => {}); // never: the test kills this sidecar here
}

/**
 * The incoming QEMU, guarded (it must not outlive this sidecar until the migration ends),
 * recorded in the migration marker, shown in status, its NICs connected; its exit before
 * the end fails the migration.
 */
async function startQemu(ctx: DestContext): Promise<void> {
  const vm = ctx.vm;
  await vm.startIncoming(ctx.opts.sendConfiguration);
  // From here until completed or fenced, this guest must not outlive this sidecar.
  ctx.guard = QemuGuard.arm(vm.qemu!.pid);
  await vm.setMigrationMarker({
    role: 'destination',
    migrationId: ctx.id,
    qemuPid: vm.qemu?.pid ?? null,
    peer: ctx.ch.remote,
    startedAt: new Date().toISOString(),
  });
  ctx.opts.onInstance?.(vm);
  await ctx.opts.onQemuStarted?.(vm);
  void vm.qemu!.exited.then(() => {
    if (ctx.stopped) return;
    ctx.log.error('destination QEMU exited during migration');
    ctx.ch
      .send({ type: 'abort', code: 'ERR_DEST_QEMU_EXITED', reason: 'destination QEMU exited' })
      .catch(ignored(ctx.log, 'the channel may be closed: the source then fails over on silence'));
    void fence(ctx, 'destination-qemu-exited');
  });
}

/** Before the port opens: QEMU accepts no stream that does not prove this migration's key. */
async function setUpTls(ctx: DestContext): Promise<void> {
  if (ctx.faults.plainStream) {
    ctx.log.warn('fault injection: the incoming migration stream goes without TLS');
    return;
  }
  ctx.tls = await StreamTls.setUp({
    qmp: ctx.vm.qemu!.qmp,
    vmDir: ctx.vm.dir,
    endpoint: 'server',
    psk: streamPsk(ctx.opts.host.peer.key, ctx.id),
    log: ctx.log,
  });
}

/** The first free port of the host's migration range that QEMU listens on. */
async function listen(ctx: DestContext): Promise<string> {
  const { listenHost, portRange } = ctx.opts.host.migration;
  const qmp = ctx.vm.qemu!.qmp;
  let lastErr: unknown;
  for (let port = portRange[0]; port <= portRange[1]; port++) {
    const uri = migrationUri(listenHost, port); // the only form the source accepts (uri.ts)
    try {
      await migrateIncoming(qmp, uri);
      return uri;
    } catch (e) {
      lastErr = e;
    }
  }
  throw new TetherError('ERR_NO_MIGRATION_PORT', `no free port for the incoming migration in ${portRange.join('-')}`, {
    cause: errorFields(lastErr),
  });
}
