/**
 * The demo: two hosts in network namespaces, each with a tether daemon. A VM
 * running memcheck (which verifies every page of a 96 MiB buffer on each
 * pass) boots on the source, migrates with post-copy, and the destination
 * QEMU is killed with SIGKILL in the middle. The VM resumes on the source from
 * the last acknowledged checkpoint and memcheck keeps passing. Then the same
 * VM migrates again and completes.
 */
import { Cluster, fileSize, memcheck, waitPasses } from '../netns-tests/harness.ts';
import { waitApplied } from '../netns-tests/scenarios.ts';

const say = (s: string) => process.stdout.write(`\n\x1b[1m== ${s}\x1b[0m\n`);
const line = (s: string) => process.stdout.write(`   ${s}\n`);

async function main(): Promise<number> {
  const c = new Cluster();
  try {
    say('creating two hosts (network namespaces) linked by veth, one tether daemon each');
    await c.up();
    line(`source      ${c.src.name}  ${c.src.addr}  (ns ${c.src.ns})`);
    line(`destination ${c.dst.name}  ${c.dst.addr}  (ns ${c.dst.ns})`);

    say('starting a 512 MiB VM on the source: memcheck verifies every page of its buffer each pass');
    const st = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
    if (st.code !== 0) throw new Error(st.stderr);
    await waitPasses(c.serialLog(c.src), 0, 2, 'on the source');
    line(`memcheck on the source: passes ${memcheck(c.serialLog(c.src)).passes.join(' ')}`);

    say('migrating with post-copy; the destination streams checkpoints back to the source');
    const migrating = c.migrate();
    await waitApplied(c, 5, migrating);
    const d = await c.status(c.dst);
    const s = await c.status(c.src);
    line(`VM runs on the destination (QEMU pid ${d.pid}, state ${d.state}); checkpoint ${s.migration?.appliedEpoch} acknowledged`);

    say(`kill -9 of the destination QEMU (pid ${d.pid}) in the middle of post-copy`);
    process.kill(d.pid, 'SIGKILL');
    const mig = await migrating;
    const r = mig.result;
    line(`tether migrate exited ${mig.code}: outcome ${r?.outcome}, reason ${r?.reason}`);
    line(
      `resumed from checkpoint ${r?.rollback?.epoch}: detected in ${r?.rollback?.detectMs} ms, restored in ${r?.rollback?.restoreMs} ms`,
    );
    const from = fileSize(c.serialLog(c.src));
    const after = await waitPasses(c.serialLog(c.src), from, 2, 'after the rollback');
    line(`memcheck on the source after rollback: passes ${after.passes.join(' ')}, corrupt pages: ${after.corrupt.length}`);
    const srcStatus = await c.status(c.src);
    line(`source status: ${srcStatus.state} (QEMU pid ${srcStatus.pid})`);

    say('migrating the same VM again, this time to completion');
    const again = await c.migrate();
    const a = again.result;
    line(
      `tether migrate exited ${again.code}: outcome ${a?.outcome} in ${a?.totalMs} ms, ${a?.checkpoints} checkpoints, pause p50 ${a?.pauseMs?.p50} ms`,
    );
    const from2 = fileSize(c.serialLog(c.dst));
    const onDst = await waitPasses(c.serialLog(c.dst), from2, 1, 'on the destination');
    line(`memcheck on the destination: passes ${onDst.passes.join(' ')}, corrupt pages: ${onDst.corrupt.length}`);

    const corrupt = memcheck(c.serialLog(c.src)).corrupt.length + memcheck(c.serialLog(c.dst)).corrupt.length;
    const ok = mig.code === 3 && again.code === 0 && corrupt === 0 && after.passes.length >= 2;
    say(ok ? 'the VM survived the interruption, with every page intact' : 'UNEXPECTED RESULT: see the logs');
    if (!ok) line(`daemon logs: ${c.src.daemonLog} ${c.dst.daemonLog}`);
    return ok ? 0 : 1;
  } finally {
    await c.cleanup();
  }
}

process.exitCode = await main();
