/**
 * The destination journal's write-ahead log (docs/journal.md "Restart"): D's sidecar
 * dies while it holds journaled guest writes. Its restart never serves the image
 * pass-through before the outcome is known: it fences (before the completion request)
 * or rebuilds the journal from the log (after it). Asserted on what the guest observes:
 * diskcheck on whichever host runs the VM.
 */
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import { LogKind, replayJournalLog } from '../src/disk/journal-log.ts';
import type { LogRecord } from '../src/disk/journal-log.ts';
import { diskcheck, waitDiskPasses } from '../lab/serial.ts';
import { fileSize, qemuAlive, waitFor } from '../lab/proc.ts';
import type { Cluster } from '../lab/cluster.ts';
import { armAckHold, assertDiskSurvivedOnSource, assertNotRunningOn, bootDiskCluster, DISK_HOLD } from './scenarios.ts';
import { waitApplied } from '../lab/cluster.ts';

const disk = { guest: 'diskcheck' as const };

/** Journal logs the destination still has for the VM. */
const logsOf = (c: Cluster): string[] => {
  const dir = path.join(c.dst.stateDir, 'journal');
  return fs.existsSync(dir) ? fs.readdirSync(dir).filter((n) => n.startsWith(`${c.vmName}.`)) : [];
};

/**
 * The image against the destination's write-ahead log, after a rollback to checkpoint
 * `resumed`: `kept` lists the logged writes of acknowledged epochs (<= resumed) the image
 * lacks (the image with every such record applied again, in log order, must be the image
 * itself), `lost` those of rolled-back epochs (> resumed) the image holds. diskcheck
 * gives every write unique content (block and sequence number in its header), so a lost
 * write found in the image was written there.
 */
function imageAgainstLog(img: Buffer, records: LogRecord[], resumed: number): { kept: string[]; lost: string[] } {
  const model = Buffer.from(img);
  const lost: string[] = [];
  for (const r of records) {
    if (r.kind === LogKind.Completed) continue;
    const end = r.offset + (r.kind === LogKind.Write ? r.data.length : r.length);
    if (r.epoch <= resumed) {
      if (r.kind === LogKind.Write) r.data.copy(model, r.offset);
      else model.fill(0, r.offset, end);
    } else if (r.kind === LogKind.Write && img.subarray(r.offset, end).equals(r.data)) {
      lost.push(`epoch ${r.epoch} offset ${r.offset} +${r.data.length}`);
    }
  }
  const kept: string[] = [];
  for (let off = 0; off < img.length && kept.length < 20; off += 4096) {
    if (!img.subarray(off, off + 4096).equals(model.subarray(off, off + 4096))) kept.push(`block at ${off}`);
  }
  return { kept, lost };
}

t.test('D sidecar killed -9 mid-window: its restart drops the log unread; S resumes, disk consistent', async (t) => {
  const c = await bootDiskCluster(t, { disk, holdCompletion: true });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  // the guest writes on the destination: those writes are journaled (and logged) there
  await waitDiskPasses(c.serialLog(c.dst), 0, 1, 'on the destination');
  t.equal(logsOf(c).length, 1, 'the destination keeps one log for the migration');
  await c.killDaemon(c.dst);
  const mig = await migrating;
  await c.restartDaemon(c.dst);
  await assertDiskSurvivedOnSource(t, c, mig);
  t.same(logsOf(c), [], 'the restarted destination dropped the log');
  t.match(fs.readFileSync(c.dst.daemonLog, 'utf8'), /journal log of an interrupted incoming migration dropped/);
});

t.test(
  'D sidecar dies on the completion answer: its restart rebuilds the journal from a log in segments, the VM runs on D, disk consistent',
  async (t) => {
    // 256 KiB log segments (disk.journalSegmentBytes, the smallest): the guest's writes fill
    // several in the window, and those whose epochs S acknowledged are deleted.
    const c = await bootDiskCluster(t, {
      disk: { ...disk, journalSegmentBytes: 256 * 1024 },
      faults: { destination: 'cut-completion=6' },
      vm: { maxBandwidth: 0 },
      holdCompletion: true,
    });
    const migrating = c.migrate();
    // Completion only once the log has rotated twice and dropped its first segment: the
    // guest writes until then, however long it takes.
    const segs = () =>
      logsOf(c)
        .map((n) => /\.wal(?:\.(\d+))?$/.exec(n)?.[1] ?? '0')
        .map(Number);
    await waitFor(
      () => segs().length > 0 && Math.min(...segs()) >= 1 && Math.max(...segs()) >= 2,
      'log segments rotated and pruned',
      180_000,
    );
    t.comment(`log segments before completion: ${logsOf(c).join(' ')}`);
    c.releaseCompletion();
    const daemon = c.dst.daemon!;
    await waitFor(() => daemon.exitCode !== null || daemon.signalCode !== null, 'destination sidecar gone', 120_000);
    t.ok(
      logsOf(c).length >= 1 && !logsOf(c).some((n) => n.endsWith('.wal')),
      `the log outlived the sidecar, its first segment deleted: ${logsOf(c).join(' ')}`,
    );
    const mig = await migrating;
    t.equal(mig.code, 0, `the source recorded completion: ${mig.stderr.slice(-1500)}`);
    t.equal(mig.result?.outcome, 'completed');
    await c.restartDaemon(c.dst);
    await waitFor(async () => (await c.status(c.dst)).state === 'running', 'VM running on the destination', 120_000);
    const s = await c.status(c.dst);
    t.ok(qemuAlive(s.pid), 'destination QEMU alive');
    const from = fileSize(c.serialLog(c.dst));
    const rep = await waitDiskPasses(c.serialLog(c.dst), from, 2, 'on the destination after the restart');
    t.same(rep.mismatch, [], 'no MISMATCH after the restart: no acknowledged write lost');
    t.same(diskcheck(c.serialLog(c.dst)).mismatch, [], 'no MISMATCH anywhere in the destination serial log');
    const log = fs.readFileSync(c.dst.daemonLog, 'utf8');
    t.match(log, /journal rebuilt from its log/, 'the restart served the journal, not the image');
    t.same(logsOf(c), [], 'written back: the log is gone');
    await assertNotRunningOn(t, c, c.src);
  },
);

/**
 * Kill -9 of D's sidecar during the write-back, held after its first extent (of at least
 * two) by `fault`, which logs `held` (with the extent count) when it is there.
 */
async function killDuringWriteBack(t: Test, fault: string, held: string, restartSays?: RegExp): Promise<void> {
  const c = await bootDiskCluster(t, { disk, faults: { destination: fault }, vm: { maxBandwidth: 0 } });
  const migrating = c.migrate();
  // The image holds part of the journal, the log all of it with its completed record.
  const line = new RegExp(`"msg":"${held}[^\\n]*"extents":(\\d+)`);
  await waitFor(() => line.test(fs.readFileSync(c.dst.daemonLog, 'utf8')), held);
  const extents = Number(line.exec(fs.readFileSync(c.dst.daemonLog, 'utf8'))![1]);
  t.ok(extents >= 2, `the write-back had ${extents} extents to write: it stopped part way`);
  const mig = await migrating;
  t.equal(mig.code, 0, `the source recorded completion: ${mig.stderr.slice(-1500)}`);
  t.equal(mig.result?.outcome, 'completed');
  t.equal(logsOf(c).length, 1, 'the log (with its completed record) is still there');
  await c.killDaemon(c.dst);
  await c.restartDaemon(c.dst, { faults: undefined });
  const log = fs.readFileSync(c.dst.daemonLog, 'utf8');
  t.match(log, /journal log held a completed migration: written back into the image/, 'the restart wrote the journal back from the log');
  t.same(logsOf(c), [], 'written back: the log is gone');
  if (restartSays) t.match(log, restartSays, 'the restart acted on the answer the log recorded');
  await waitFor(async () => (await c.status(c.dst)).state === 'running', 'VM running on the destination', 120_000);
  t.ok(qemuAlive((await c.status(c.dst)).pid), 'destination QEMU alive');
  // Two more passes: the second verified every block the guest wrote, those whose write
  // was in the log only when the sidecar died included.
  const from = fileSize(c.serialLog(c.dst));
  const rep = await waitDiskPasses(c.serialLog(c.dst), from, 2, 'on the destination after the restart');
  t.same(rep.mismatch, [], 'no MISMATCH after the restart: every acknowledged write is in the image');
  t.same(diskcheck(c.serialLog(c.dst)).mismatch, [], 'no MISMATCH anywhere in the destination serial log');
  await assertNotRunningOn(t, c, c.src);
}

t.test('D sidecar killed -9 during the write-back: its restart finishes it from the log, the VM runs on D, disk consistent', (t) =>
  killDuringWriteBack(t, 'hold-writeback', 'fault injection: write-back held after its first extent, completion records dropped'),
);

t.test('D sidecar killed -9 during the write-back, completion records not yet dropped: the VM runs on D, disk consistent', (t) =>
  killDuringWriteBack(
    t,
    'hold-writeback-early',
    'fault injection: write-back held after its first extent, completion records kept',
    /the journal log recorded the source answer completed/,
  ),
);

t.test("D sidecar killed -9 inside an ACK hold: S's image holds every acknowledged write and none of a rolled-back epoch", async (t) => {
  // crash-before-resume on S: its rollback stops (the sidecar dies) with the restored QEMU
  // not yet resumed, so the image is exactly what the rollback left, before the guest
  // writes anything on S again.
  const c = await bootDiskCluster(t, {
    disk,
    vm: DISK_HOLD.vm,
    faults: { source: `${DISK_HOLD.source},crash-before-resume` },
    holdCompletion: true,
  });
  const migrating = c.migrate();
  await waitApplied(c, 3, migrating);
  await waitDiskPasses(c.serialLog(c.dst), 0, 1, 'on the destination');
  const held = await armAckHold(c, migrating);
  // Two passes printed after checkpoint `held` was taken: the second one's writes are all in
  // later epochs, which the source never applies (applies wait behind the held ACK).
  await waitDiskPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 2, 'on the destination while the ACK is held');
  t.equal((await c.status(c.src)).migration?.appliedEpoch, held, `the source still holds at checkpoint ${held}`);
  const [name] = logsOf(c);
  t.ok(name, 'the destination keeps its log');
  await c.killDaemon(c.dst);
  const mig = await migrating;
  t.not(mig.code, 0, 'the migrate command lost the source sidecar in its rollback');
  await waitFor(() => c.src.daemon?.exitCode !== null || c.src.daemon?.signalCode !== null, 'the source sidecar to die before resuming');
  const replay = await replayJournalLog(path.join(c.dst.stateDir, 'journal', name!));
  const late = replay.records.filter(
    (r): r is Extract<LogRecord, { kind: typeof LogKind.Write }> => r.kind === LogKind.Write && r.epoch > held,
  );
  t.ok(late.length > 0, `the destination's guest wrote ${late.length} blocks in epochs after ${held}`);
  const img = fs.readFileSync(c.diskImage);
  const { kept, lost } = imageAgainstLog(img, replay.records, held);
  t.same(lost, [], 'no write of a rolled-back epoch is in the image');
  t.same(kept, [], 'every logged write of an acknowledged epoch is in the image');
  // The check itself can fail: the same image with one rolled-back write planted into it.
  const planted = Buffer.from(img);
  const first = late[0]!;
  first.data.copy(planted, first.offset);
  t.ok(
    imageAgainstLog(planted, replay.records, held).lost.includes(`epoch ${first.epoch} offset ${first.offset} +4096`),
    'control: a rolled-back write planted into a copy of the image is found',
  );
  // The restarted source resumes the restored QEMU; diskcheck agrees with the image.
  await c.restartDaemon(c.src, { faults: undefined });
  t.equal((await c.status(c.src)).state, 'running', 'the VM runs on the source');
  const rep = await waitDiskPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 2, 'on the source after the rollback');
  t.same(rep.mismatch, [], 'no MISMATCH after the rollback');
  t.same(diskcheck(c.serialLog(c.src)).mismatch, [], 'no MISMATCH anywhere in the source serial log');
  await c.restartDaemon(c.dst);
  t.same(logsOf(c), [], 'the restarted destination dropped the log');
});
