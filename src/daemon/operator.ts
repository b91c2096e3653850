/**
 * An operator resolving a VM a restart could not decide (`unrecovered`), over the control
 * socket: `tether vm adopt` accepts what runs, `tether vm forget` drops this host's records.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { TetherError } from '../errors.ts';
import { closeDiskWindow } from '../migrate/completion/destination.ts';
import { queryStatus } from '../qemu/commands.ts';
import type { QemuIdentity } from '../qemu/process.ts';
import type { VmInstance } from '../vm/instance.ts';
import type { DaemonContext } from './context.ts';
import { letGo, settled, vmStatus } from './context.ts';
import { resumePaused } from './adopted.ts';
import { QMP_RECOVERY_MS, recordedQemus } from './qemu-records.ts';

/** The records `forget` drops: the VM, its migration marker, completion request, unrecovered cause, standby. */
const RECORDS = ['vm.json', 'migration.json', 'completing.json', 'unrecovered.json', 'standby.json'];

/**
 * `tether vm forget <vm>`: drop this host's records of the VM (vm.json, marker, completion
 * request, unrecovered cause) and nothing else: no process is signalled, no RAM file, disk or
 * TAP is touched. Refused (ERR_VM_QEMU_ALIVE) while a QEMU the records name still runs,
 * unless `force` (it then runs on, unsupervised). For a VM that is not running here only.
 */
export async function forget(ctx: DaemonContext, name: string, force: boolean): Promise<Record<string, unknown>> {
  const vm = ctx.vms.get(name);
  const dir = path.join(ctx.host.stateDir, name);
  if (!vm && !ctx.damaged.has(name)) throw new TetherError('ERR_NO_SUCH_VM', `no VM named ${name} on host ${ctx.host.name}`);
  if (vm?.place === 'recovering') settled(vm);
  if (vm && !['unrecovered', 'stopped', 'gone', 'fenced'].includes(vm.place)) {
    throw new TetherError('ERR_VM_BUSY', `VM ${name} is ${vm.place} here: stop it (tether vm stop) instead of forgetting it`);
  }
  let alive: QemuIdentity[] = [];
  if (vm) alive = await recordedQemus(vm, vm.log);
  if (!vm && !force) {
    throw new TetherError(
      'ERR_VM_QEMU_ALIVE',
      `VM ${name}'s record is damaged: whether a QEMU of it runs is unknown; check, then --force`,
      {
        vm: name,
        pids: [],
      },
    );
  }
  if (alive.length > 0 && !force) {
    throw new TetherError(
      'ERR_VM_QEMU_ALIVE',
      `VM ${name}: QEMU pid ${alive.map((q) => q.pid).join(', ')} started by this sidecar still runs; ` +
        'stop it yourself, or forget with --force to leave it running unsupervised',
      { vm: name, pids: alive.map((q) => q.pid) },
    );
  }
  for (const f of RECORDS) await fs.rm(path.join(dir, f), { force: true });
  if (vm) await letGo(ctx, vm);
  ctx.vms.delete(name);
  ctx.damaged.delete(name);
  ctx.awaitingAnswer.delete(name);
  ctx.log.warn('VM forgotten by the operator: its records are dropped, nothing else touched', {
    vm: name,
    leftRunning: alive.map((q) => q.pid),
  });
  return { vm: name, forgotten: true, leftRunning: alive.map((q) => q.pid) };
}

/**
 * `tether vm adopt <vm>`: the operator checked an unrecovered VM and accepts what runs. The
 * one live QEMU its records name becomes its QEMU (resumed and announced if it is paused:
 * the operator says this copy is the VM); with none, the VM is stopped. Two live QEMUs are
 * refused (ERR_VM_QEMU_ALIVE): the operator stops one first. The migration records go.
 */
export async function adoptByOperator(ctx: DaemonContext, vm: VmInstance): Promise<Record<string, unknown>> {
  if (vm.place !== 'unrecovered') settled(vm);
  if (vm.place !== 'unrecovered') throw new TetherError('ERR_USAGE', `VM ${vm.name} is ${vm.place}, not unrecovered: nothing to adopt`);
  const log = ctx.log.child({ vm: vm.name });
  const alive = await recordedQemus(vm, log);
  if (alive.length > 1) {
    throw new TetherError(
      'ERR_VM_QEMU_ALIVE',
      `VM ${vm.name}: ${alive.length} QEMUs run (pids ${alive.map((q) => q.pid).join(', ')}); stop all but the VM's, then adopt`,
      { vm: vm.name, pids: alive.map((q) => q.pid) },
    );
  }
  vm.place = 'recovering';
  let resumed = false;
  try {
    resumed = alive.length === 1 ? await adoptOne(ctx, vm, alive[0]!) : false;
    if (alive.length === 0) vm.place = 'stopped';
  } catch (e) {
    const err = e as TetherError;
    await letGo(ctx, vm);
    vm.place = 'unrecovered';
    throw new TetherError(err.code ?? 'ERR_RECOVERY', `adopting VM ${vm.name} failed, it stays unrecovered: ${err.message}`, {
      vm: vm.name,
    });
  }
  await vm.setMigrationMarker(null);
  await fs.rm(path.join(vm.dir, 'completing.json'), { force: true });
  await vm.clearUnrecovered();
  ctx.awaitingAnswer.delete(vm.name);
  log.warn('unrecovered VM adopted by the operator', { pid: alive[0]?.pid ?? null, resumed });
  return { ...vmStatus(ctx, vm), adopted: alive[0]?.pid ?? null, resumed };
}

/** The operator's adopt of the one live QEMU: running when it returns; true if it was paused and resumed here. */
async function adoptOne(ctx: DaemonContext, vm: VmInstance, id: QemuIdentity): Promise<boolean> {
  const log = ctx.log.child({ vm: vm.name });
  await vm.adopt(id, QMP_RECOVERY_MS);
  await closeDiskWindow(vm, undefined, log);
  const { status } = await queryStatus(vm.qemu!.qmp, { timeoutMs: QMP_RECOVERY_MS });
  let resumed = false;
  if (status !== 'running') {
    await resumePaused(ctx, vm);
    resumed = true;
  }
  vm.place = 'running';
  if (!ctx.nics.has(vm.name)) await ctx.nics.openPass(vm);
  return resumed;
}
