/**
 * Steady state is QEMU's own file node (docs/disk.md): outside a destination's post-copy
 * window no byte of the guest's disk I/O passes through the sidecar.
 * - kill -9 of the sidecar of a running, not migrating VM: diskcheck goes on, with no
 *   error and no MISMATCH, while the sidecar is dead (with the disk on the sidecar's NBD
 *   export the guest's I/O would wait for it, then fail: no pass would complete);
 * - after a completed migration the destination's QEMU has no NBD node left (QEMU's own
 *   query-named-block-nodes, through `tether status`), and diskcheck stays consistent;
 * - in both, QEMU's image locking still refuses a second writer (qemu-io on the image).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import t from 'tap';
import { diskcheck, waitDiskPasses } from '../lab/serial.ts';
import { fileSize, qemuAlive, waitFor } from '../lab/proc.ts';
import { bootDiskCluster, diskNodes, waitDiskWindowClosed } from './scenarios.ts';

const disk = { guest: 'diskcheck' as const };

/**
 * A second writer opening the image (qemu-io, read-write, no force-share) while the VM's QEMU
 * runs: QEMU's image locking must refuse it at open, before any I/O (`quit` is its only command).
 */
function secondWriter(image: string): { refused: boolean; output: string } {
  const r = spawnSync('qemu-io', ['-f', 'raw', '-c', 'quit', image], { encoding: 'utf8', timeout: 30_000 });
  const output = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  return { refused: r.status !== 0 && /lock/i.test(output), output };
}

/** diskcheck's MISMATCH and error lines, and the guest kernel's block I/O errors, in the serial log from `from`. */
function ioErrors(serialLog: string, from: number): string[] {
  const lines = fs.readFileSync(serialLog).subarray(from).toString('latin1').split(/\r?\n/);
  return diskcheck(serialLog, from).mismatch.concat(lines.filter((l) => /I\/O error|blk_update_request|Buffer I\/O/.test(l)));
}

t.test('kill -9 of the sidecar of a running VM: the guest disk carries on untouched', async (t) => {
  const c = await bootDiskCluster(t, { disk });
  const before = await diskNodes(c, c.src);
  t.equal(before.window, false, 'no disk window on a VM started with vm start');
  t.ok(before.nodes?.includes('f0:file') && before.nodes.includes('disk0:raw'), `QEMU's own file node: ${before.nodes}`);
  t.notOk(
    before.nodes?.some((n) => n.endsWith(':nbd')),
    'no NBD node',
  );
  const w = secondWriter(c.diskImage);
  t.ok(w.refused, `QEMU's lock refuses a second writer in steady state: ${w.output.trim()}`);
  const pid = (await c.status(c.src)).pid as number;
  const log = c.serialLog(c.src);
  const from = fileSize(log);
  await c.killDaemon(c.src);
  // By construction: these passes run while the sidecar is dead.
  const rep = await waitDiskPasses(log, from, 3, 'with the sidecar dead');
  t.ok(qemuAlive(pid), 'QEMU runs on');
  t.same(rep.mismatch, [], 'no MISMATCH or diskcheck error while the sidecar is dead');
  t.same(ioErrors(log, from), [], 'no I/O error in the guest');
  await c.restartDaemon(c.src);
  const s = await c.status(c.src);
  t.equal(s.state, 'running', 'the restarted sidecar adopted the VM');
  t.equal(s.pid, pid, 'the same QEMU');
  const after = await diskNodes(c, c.src);
  t.equal(after.window, false, 'the restarted sidecar serves no disk');
  t.notOk(
    after.nodes?.some((n) => n.endsWith(':nbd')),
    `still no NBD node: ${after.nodes}`,
  );
  const more = await waitDiskPasses(log, fileSize(log), 2, 'after the restart');
  t.same(more.mismatch, [], 'no MISMATCH after the restart');
});

t.test('completed migration: the destination QEMU ends on its own file node, no NBD node left', async (t) => {
  const c = await bootDiskCluster(t, { disk });
  const mig = await c.migrate();
  t.equal(mig.result?.outcome, 'completed', `completed: ${mig.stderr.slice(-1500)}`);
  const d = await waitDiskWindowClosed(c);
  t.ok(d.nodes?.includes('f0:file') && d.nodes.includes('disk0:raw'), `file node under disk0: ${d.nodes}`);
  t.notOk(
    d.nodes?.some((n) => n.endsWith(':nbd')),
    'no NBD node on the destination QEMU',
  );
  const w = secondWriter(c.diskImage);
  t.ok(w.refused, `D's QEMU took the image's lock at the switch: a second writer is refused: ${w.output.trim()}`);
  const log = c.serialLog(c.dst);
  const rep = await waitDiskPasses(log, fileSize(log), 2, 'on the destination after the switch');
  t.same(rep.mismatch, [], 'no MISMATCH on the destination after the switch');
  t.same(ioErrors(log, 0), [], 'no I/O error in the guest on the destination');
  t.same(diskcheck(log).mismatch, [], 'no MISMATCH anywhere in the destination serial log');
});
