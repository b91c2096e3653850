import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { fileSize } from '../lab/proc.ts';
import { memcheck, waitPasses } from '../lab/serial.ts';
import { bootCluster } from './scenarios.ts';

t.test('the destination runs only its own VM config: unknown VM and other device model are refused', async (t) => {
  // unthrottled: the refusals come before any transfer, and the final migration only has to complete
  const c = await bootCluster(t, { vm: { maxBandwidth: 0 } });
  const before = await c.status(c.src);
  const dstYaml = path.join(c.dst.vmConfigDir, `${c.vmName}.yaml`);
  const yaml = fs.readFileSync(dstYaml, 'utf8');

  const refused = async (what: string, code: string): Promise<void> => {
    const mig = await c.migrate();
    t.equal(mig.code, 1, `${what}: migrate exits 1`);
    t.match(mig.stderr, code, `${what}: the CLI shows ${code}`);
    const s = await c.status(c.src);
    t.equal(s.state, 'running', `${what}: VM still runs on the source`);
    t.equal(s.pid, before.pid, `${what}: the same source QEMU, untouched`);
    t.equal(s.migration, null, `${what}: no migration in progress`);
    t.equal((await c.status(c.dst)).state, 'absent', `${what}: the destination has no such VM`);
    t.notOk(fs.existsSync(path.join(c.dst.stateDir, c.vmName)), `${what}: nothing created on the destination`);
    t.notOk(fs.existsSync(path.join(c.src.stateDir, c.vmName, 'migration.json')), `${what}: no marker left on the source`);
  };

  fs.rmSync(dstYaml);
  await refused('no config on the destination', 'ERR_PEER_UNKNOWN_VM');

  const mem = Number(/^memoryMiB: (\d+)$/m.exec(yaml)?.[1]);
  fs.writeFileSync(dstYaml, yaml.replace(/^memoryMiB: \d+$/m, `memoryMiB: ${mem * 2}`));
  await refused('another memory size on the destination', 'ERR_PEER_DEVICE_MODEL');

  // The guest never noticed, and with the right config the migration goes through.
  const rep = await waitPasses(c.serialLog(c.src), fileSize(c.serialLog(c.src)), 1, 'after the refusals');
  t.same(rep.corrupt, [], 'no CORRUPT');
  fs.writeFileSync(dstYaml, yaml);
  const mig = await c.migrate();
  t.equal(mig.code, 0, `with matching configs the migration completes: ${mig.stderr.slice(-1500)}`);
  const after = await waitPasses(c.serialLog(c.dst), fileSize(c.serialLog(c.dst)), 1, 'on the destination');
  t.same(after.corrupt, [], 'no CORRUPT on the destination');
  t.same(memcheck(c.serialLog(c.src)).corrupt, [], 'no CORRUPT on the source');
});
