/**
 * What the daemon's parts share (daemon.ts builds it once): the host, its VMs and their
 * migrations in each direction, the NIC ports, the metrics; and the few checks and views
 * every part applies to a VM (settled, status, letGo).
 */
import type { HostConfig } from '../config/types.ts';
import type { BlockJournal } from '../disk/journal.ts';
import { TetherError } from '../errors.ts';
import type { DestinationMigration } from '../migrate/destination.ts';
import type { Faults } from '../migrate/faults.ts';
import type { SourceMigration } from '../migrate/source.ts';
import type { TetherMetrics } from '../metrics/registry.ts';
import { ignored } from '../util/log.ts';
import type { Logger } from '../util/log.ts';
import type { VmInstance } from '../vm/instance.ts';
import type { Nics } from './nics.ts';

/** An incoming VM whose completion request was pending when the sidecar restarted (recovery-destination.ts). */
export interface AwaitingAnswer {
  vm: VmInstance;
  epoch: number;
  migrationId: string;
  journal?: BlockJournal;
}

export interface DaemonContext {
  readonly host: HostConfig;
  readonly log: Logger;
  readonly faults: Faults;
  readonly metrics: TetherMetrics;
  readonly vms: Map<string, VmInstance>;
  readonly outgoing: Map<string, SourceMigration>;
  readonly incoming: Map<string, DestinationMigration>;
  /** Incoming VMs whose completion request was pending when the sidecar restarted. */
  readonly awaitingAnswer: Map<string, AwaitingAnswer>;
  /** VM names whose vm.json was damaged at start: never booted over until resolved by hand. */
  readonly damaged: Set<string>;
  /** Each VM's NIC ports on this host. */
  readonly nics: Nics;
}

/** The VM of that name on this host, or ERR_NO_SUCH_VM. */
export function vmNamed(ctx: DaemonContext, name: string): VmInstance {
  const vm = ctx.vms.get(name);
  if (!vm) throw new TetherError('ERR_NO_SUCH_VM', `no VM named ${name} on host ${ctx.host.name}`);
  return vm;
}

/** `vm`, unless a restart has not finished recovering it (ERR_VM_RECOVERING) or left it unrecovered (ERR_VM_UNRECOVERED). */
export function settled(vm: VmInstance): VmInstance {
  if (vm.place === 'recovering') {
    throw new TetherError('ERR_VM_RECOVERING', `VM ${vm.name} is still being recovered after the sidecar restart; retry`, {
      vm: vm.name,
    });
  }
  if (vm.place === 'unrecovered') {
    const c = vm.unrecovered;
    throw new TetherError(
      'ERR_VM_UNRECOVERED',
      `VM ${vm.name} is unrecovered (${c ? `${c.code}: ${c.message}` : 'cause unknown'}); ` +
        'check its QEMU and the other host, then `tether vm adopt` or `tether vm forget` it',
      { vm: vm.name, cause: c ?? null },
    );
  }
  return vm;
}

/** A VM as `tether status` shows it: its place, QEMU, and the migration under way in either role. */
export function vmStatus(ctx: DaemonContext, vm: VmInstance): Record<string, unknown> {
  const out = ctx.outgoing.get(vm.name);
  const inc = ctx.incoming.get(vm.name);
  const awaiting = ctx.awaitingAnswer.get(vm.name);
  return {
    vm: vm.name,
    host: ctx.host.name,
    state: vm.place,
    pid: vm.qemu && !vm.qemu.hasExited ? vm.qemu.pid : null,
    memoryMiB: vm.config.memoryMiB,
    serialLog: vm.serialLog,
    ramFile: vm.ramFile,
    migration: out
      ? { role: 'source', id: out.id, phase: out.phase.state, appliedEpoch: out.appliedEpoch }
      : inc
        ? { role: 'destination', id: inc.id, phase: inc.phase.state, ackedEpoch: inc.ackedEpoch }
        : awaiting
          ? { role: 'destination', id: awaiting.migrationId, phase: 'completing', finalEpoch: awaiting.epoch }
          : null,
    lastMigration: vm.lastMigration ?? null,
    ...(vm.place === 'unrecovered' ? { unrecovered: vm.unrecovered ?? null } : {}),
  };
}

/**
 * Let go of a VM whose recovery or adoption failed, or that the operator forgot: detach its
 * QEMU (never signalled), close its disk export and NIC ports (TAPs kept).
 */
export async function letGo(ctx: DaemonContext, vm: VmInstance): Promise<void> {
  await vm.qemu?.detach().catch(ignored(vm.log, 'a QMP connection already gone: nothing to detach'));
  vm.qemu = undefined;
  await vm.stopDisk().catch(ignored(vm.log, 'the disk export may never have started'));
  await ctx.nics.close(vm.name, false);
}
