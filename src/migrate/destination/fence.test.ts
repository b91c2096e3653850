import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { testHost } from '../migrate.test-util.ts';
import type { Test } from 'tap';
import { writeCompletingRecord } from '../../checkpoint/store.ts';
import { loadVmConfig } from '../../config/load.ts';
import { newMigrationId } from '../../epoch/id.ts';
import { nullLogger } from '../../util/log.ts';
import { VmInstance } from '../../vm/instance.ts';
import { completingRecordPath } from '../completion/destination.ts';
import { fenceVm } from './fence.ts';

/** A VM with no QEMU, left as a destination that asked to complete leaves it: RAM file, marker, completion request. */
async function completingVm(t: Test): Promise<VmInstance> {
  const { host, vmFile: file } = testHost(t, 'tether-fence-');
  const vm = new VmInstance(host, loadVmConfig(file), nullLogger);
  await vm.prepareDirs();
  fs.mkdirSync(path.dirname(vm.ramFile), { recursive: true });
  fs.writeFileSync(vm.ramFile, 'ram');
  const marker = { role: 'destination' as const, migrationId: newMigrationId(), qemuPid: null, peer: '127.0.0.1:1', startedAt: '' };
  await vm.setMigrationMarker(marker);
  await writeCompletingRecord(completingRecordPath(vm), 5);
  return vm;
}

t.test('fenceVm: RAM and records gone, the completion request before the marker, afterKill before the RAM', async (t) => {
  const vm = await completingVm(t);
  const seen: string[] = [];
  const setMarker = vm.setMigrationMarker.bind(vm);
  vm.setMigrationMarker = async (m) => {
    seen.push(`marker dropped, request ${fs.existsSync(completingRecordPath(vm)) ? 'kept' : 'gone'}`);
    await setMarker(m);
  };
  await fenceVm(vm, nullLogger, async () => {
    seen.push(`afterKill, RAM ${fs.existsSync(vm.ramFile) ? 'kept' : 'gone'}`);
  });
  // A restart between the two drops must find the marker alone (it fences again), never the
  // request alone (no marker: the VM would read as not migrating, stopped here).
  t.same(seen, ['afterKill, RAM kept', 'marker dropped, request gone']);
  t.equal(vm.place, 'fenced');
  t.notOk(fs.existsSync(vm.ramFile), 'RAM file removed');
  t.equal(await VmInstance.readMarker(vm.dir), null, 'marker removed');
  t.notOk(fs.existsSync(completingRecordPath(vm)), 'completion request removed');
});

t.test('fenceVm: a failed step is logged and the fence goes on', async (t) => {
  const vm = await completingVm(t);
  vm.removeRam = async () => {
    throw new Error('injected: RAM file cannot be removed');
  };
  await fenceVm(vm, nullLogger);
  t.equal(vm.place, 'fenced', 'fenced all the same');
  t.equal(await VmInstance.readMarker(vm.dir), null, 'records dropped all the same');
  t.notOk(fs.existsSync(completingRecordPath(vm)));
});
