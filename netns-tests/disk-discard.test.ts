/**
 * A hostile guest in the destination's window: a storm of discards over the whole disk
 * beyond diskcheck's blocks (busybox `blkdiscard`, rerun by `watch` every 0.1 s in the
 * background, from boot on), while diskcheck writes and verifies its own blocks.
 *
 * TRIM is journaled as a zero extent counted at its full length (docs/journal.md "Bounded
 * memory"). Each discard (STORM.length) is larger than the journal's bound (BOUND), so it is
 * admitted only into an empty journal or by a barrier's quiesce, and every other request
 * waits behind it until a release. The source's ACK hold makes that happen by construction:
 * while it lasts nothing is released, so the second discard of the hold has to wait.
 *
 * Asserted: the journal's held bytes never exceeded the bound the design gives (a request
 * larger than the bound alone, plus what each barrier's quiesce admits while epochs are
 * unreleased: at most `window` barriers, each at most one discard plus one diskcheck write
 * in flight), the sidecar's anonymous memory grew less than the journal held (zero extents
 * hold no buffer) and less than ANON_BOUND,
 * the migration ended (completed or rolled back) and diskcheck is consistent where the VM
 * runs.
 */
import fs from 'node:fs';
import t from 'tap';
import { callDaemon } from '../src/control/client.ts';
import { diskcheck, waitDiskPasses } from '../lab/serial.ts';
import { fileSize, waitFor } from '../lab/proc.ts';
import type { Cluster } from '../lab/cluster.ts';
import {
  assertDiskSurvivedOnSource,
  assertNotRunningOn,
  bootDiskCluster,
  holdFault,
  migrateIntoHold,
  waitDiskWindowClosed,
} from './scenarios.ts';

const MiB = 1024 * 1024;
/** The smallest journalMaxBytes a VM config accepts. */
const BOUND = 32 * MiB;
/** Past diskcheck's 512 blocks (2 MiB) to the end of the 44 MiB disk: larger than BOUND. */
const STORM = { offset: 4 * MiB, length: 40 * MiB };
const HOLD_MS = 10_000;
/** checkpoint.window (the VM config's default): barriers taken before a release is needed. */
const WINDOW = 3;
/** What one barrier's quiesce can admit: the discard in flight and one diskcheck write. */
const IN_FLIGHT = STORM.length + 4096;
const JOURNAL_BOUND = Math.max(BOUND, STORM.length) + WINDOW * IN_FLIGHT;
/**
 * Anonymous memory D's sidecar may gain over the migration: less than the journal held at
 * its peak (zero extents hold no buffer; a journal that kept one would gain at least
 * that), and never more than this.
 */
const ANON_BOUND = 128 * MiB;

interface JournalFigures {
  mode: string;
  heldBytes: number;
  maxBytes: number;
  peakHeldBytes: number;
  delayedWrites: number;
  zeroBytes: number;
  journaledBytes: number;
}

async function journalOf(c: Cluster): Promise<JournalFigures | null> {
  try {
    const st = (await callDaemon(c.dst.socket, 'status', { vm: c.vmName })) as { disk?: { journal?: JournalFigures | null } };
    return st.disk?.journal ?? null;
  } catch {
    return null;
  }
}

/** RssAnon of a process, bytes (its heap and buffers; not the guest RAM it maps from tmpfs). */
function rssAnon(pid: number): number {
  const m = /^RssAnon:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'latin1'));
  return m ? Number(m[1]) * 1024 : 0;
}

t.test('discard storm during the window: journal and sidecar memory bounded, the migration ends, disk consistent', async (t) => {
  const c = await bootDiskCluster(t, {
    disk: { guest: 'diskcheck', mib: 44, journalMaxBytes: BOUND },
    vm: {
      appendExtra: `tether.bg=watch:-n:0.1:-t:blkdiscard:-o:${STORM.offset}:-l:${STORM.length}:/dev/vda`,
      failoverTimeoutMs: HOLD_MS + 10_000,
    },
    faults: { source: holdFault(HOLD_MS) },
    holdCompletion: true,
  });
  const pid = c.dst.daemon!.pid!;
  const anon0 = rssAnon(pid);
  let anonMax = anon0;
  let peak = 0;
  let last: JournalFigures | null = null;
  const sample = async (): Promise<JournalFigures | null> => {
    anonMax = Math.max(anonMax, rssAnon(pid));
    const j = await journalOf(c);
    if (j) {
      last = j;
      peak = Math.max(peak, j.peakHeldBytes, j.heldBytes);
    }
    return j;
  };
  const { migrating, holdEpoch, notEnded } = await migrateIntoHold(
    c,
    () => {
      void sample();
      return diskcheck(c.serialLog(c.dst)).passes.length >= 1;
    },
    'a diskcheck pass on the destination',
  );
  // Inside the hold nothing is released: a discard larger than the bound waits.
  await waitFor(async () => {
    notEnded('during the hold');
    const j = await sample();
    return !!j && j.delayedWrites >= 1 && j.zeroBytes >= STORM.length;
  }, 'discards journaled and a request held back by the bound');
  t.comment(`hold at checkpoint ${holdEpoch}: journal ${JSON.stringify(last)}`);
  t.equal(last!.maxBytes, BOUND, 'the journal runs with the configured bound');
  c.releaseCompletion();
  let ended = false;
  void migrating.finally(() => (ended = true));
  await waitFor(async () => {
    await sample();
    return ended;
  }, 'the migration to end');
  const mig = await migrating;
  const log = fs.readFileSync(c.dst.daemonLog, 'utf8');
  // The write-back's log line carries the journal's figures over the whole window.
  const wb = /^\{.*"msg":"journal written through to the image".*$/m.exec(log);
  const fin: Partial<JournalFigures> = { ...((last as JournalFigures | null) ?? {}), ...(wb ? (JSON.parse(wb[0]) as JournalFigures) : {}) };
  peak = Math.max(peak, fin.peakHeldBytes ?? 0);
  t.comment(
    `journal: peak held ${(peak / MiB).toFixed(1)} MiB (bound ${JOURNAL_BOUND / MiB} MiB, maxBytes ${BOUND / MiB} MiB), ` +
      `${fin.delayedWrites} requests delayed, ${((fin.zeroBytes ?? 0) / MiB).toFixed(0)} MiB discarded${wb ? '' : ' (before the end)'}; ` +
      `sidecar RssAnon ${(anon0 / MiB).toFixed(0)} -> max ${(anonMax / MiB).toFixed(0)} MiB (bound: less than the journal peak and +${ANON_BOUND / MiB} MiB)`,
  );
  t.ok(peak > 0, 'the journal held the storm');
  t.ok(peak <= JOURNAL_BOUND, `journal peak ${peak} <= ${JOURNAL_BOUND}`);
  t.ok(anonMax - anon0 < Math.min(peak, ANON_BOUND), `sidecar anonymous memory grew ${anonMax - anon0} < min(journal peak, ${ANON_BOUND})`);
  t.equal(c.dst.daemon!.exitCode, null, 'the destination sidecar stayed up');
  t.equal(c.dst.daemon!.signalCode, null, 'the destination sidecar was not killed');
  if (mig.result?.outcome === 'completed') {
    t.equal(mig.code, 0, `completed: ${mig.stderr.slice(-1500)}`);
    const d = await waitDiskWindowClosed(c);
    t.notOk(
      d.nodes?.some((n) => n.endsWith(':nbd')),
      `the destination QEMU runs on its file node: ${d.nodes}`,
    );
    const rep = await waitDiskPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 2, 'on the destination after completion');
    t.same(rep.mismatch, [], 'no MISMATCH on the destination');
    t.same(diskcheck(c.serialLog(c.dst)).mismatch, [], 'no MISMATCH anywhere in the destination serial log');
    await assertNotRunningOn(t, c, c.src);
  } else {
    t.comment(`rolled back: ${mig.stderr.slice(-800)}`);
    await assertDiskSurvivedOnSource(t, c, mig);
  }
});
