/**
 * The guest NICs of this host's VMs, as the daemon holds them: for each VM its NIC ports
 * (TAP + gate + QEMU socket, src/net/nic.ts) in the order of its config's `nics`.
 *
 * Steady state (a VM started here, adopted, restored or past its window): ports in `pass`
 * mode, QEMU's own tap backend carries the guest's frames. A destination's post-copy window:
 * ports created `gated` with a relay (peer-admission.ts) before its QEMU starts.
 */
import path from 'node:path';
import type { Faults } from '../migrate/faults.ts';
import type { TetherMetrics } from '../metrics/registry.ts';
import { dropStaleRelays, NicPort, removeNicTaps } from '../net/nic.ts';
import { gateDefaults, gateReserve } from '../gate/reserve.ts';
import type { Logger } from '../util/log.ts';
import type { VmInstance } from '../vm/instance.ts';

/** How long a VM start or an incoming migration waits for QEMU's NIC sockets. */
export const NIC_CONNECT_MS = 10_000;

export class Nics {
  readonly #ports = new Map<string, NicPort[]>();
  readonly #faults: Faults;
  readonly #metrics: TetherMetrics;
  readonly #log: Logger;

  constructor(faults: Faults, metrics: TetherMetrics, log: Logger) {
    this.#faults = faults;
    this.#metrics = metrics;
    this.#log = log;
  }

  /** Whether the VM has NIC ports on this host. */
  has(vm: string): boolean {
    return this.#ports.has(vm);
  }

  /** NIC ports of `vm` (no I/O yet): their gates exist from here on. */
  create(vm: VmInstance, mode: 'pass' | 'gated', relay = false): NicPort[] {
    const logOn = process.env.TETHER_GATE_LOG === '1';
    const ports = (vm.config.nics ?? []).map(
      (nic, i) =>
        new NicPort({
          vm: vm.name,
          index: i,
          nic,
          ...(relay ? { relay: vm.nicRelays[i]!, ...this.#relayFaults() } : {}),
          mode,
          bounds: vm.config.gate ?? gateDefaults(gateReserve()),
          checkpointWindow: vm.config.checkpoint.window,
          counters: this.#metrics.nicCounters(vm.name, `net${i}`),
          log: this.#log.child({ vm: vm.name }),
          ...(logOn ? { releaseLogFile: path.join(vm.dir, `net${i}.gate.jsonl`) } : {}),
        }),
    );
    this.#ports.set(vm.name, ports);
    return ports;
  }

  /** The relay's fault switches (TETHER_FAULTS relay-pause-*, relay-sndbuf-default), as NicPort options. */
  #relayFaults(): { pauseReading?: { ms: number; epoch: number; bytes?: number }; keepQemuSndbuf?: true } {
    const f = this.#faults;
    return {
      ...(f.relayPauseMs
        ? {
            pauseReading: {
              ms: f.relayPauseMs,
              epoch: f.relayPauseEpoch ?? 5,
              ...(f.relayPauseBytes !== undefined ? { bytes: f.relayPauseBytes } : {}),
            },
          }
        : {}),
      ...(f.relaySndbufDefault ? { keepQemuSndbuf: true as const } : {}),
    };
  }

  /** Relays (a destination's window) connected to QEMU's sockets (QEMU must be started); nothing else to do. */
  async open(vm: VmInstance, ports: NicPort[]): Promise<void> {
    for (const p of ports) await p.open(() => vm.qemu?.pid);
    await Promise.all(ports.map((p) => p.waitConnected(NIC_CONNECT_MS)));
    if (ports.length) vm.log.info('NICs connected', { nics: ports.map((p) => p.name) });
  }

  /** New `pass` ports for a VM whose QEMU runs (adopted, restored): created and connected. */
  openPass(vm: VmInstance): Promise<void> {
    return this.open(vm, this.create(vm, 'pass'));
  }

  /**
   * After a restart, once the VM's place is known: NIC ports for a VM that runs here (a
   * window's filters the dead sidecar did not detach would cut the guest off: dropped
   * first; QEMU's tap backend never noticed the sidecar die), and the TAPs of one that does
   * not run here (nor is migrating in) removed. A VM recovered while `migrating-in` is
   * settled again once the source's answer placed it (recovery-destination.ts).
   */
  async settle(vm: VmInstance): Promise<void> {
    if (vm.place === 'running' && !this.has(vm.name)) {
      await this.attachHere(vm);
    } else if (vm.place !== 'running' && vm.place !== 'migrating-in') {
      for (const nic of vm.config.nics ?? []) await removeNicTaps(nic.tap);
    }
  }

  /**
   * The VM's guest frames on QEMU's own tap from now on: a window's filters a dead sidecar
   * left are dropped (without a relay they drop every frame), and `pass` ports opened (no
   * I/O of theirs: the guest may still be paused).
   */
  async attachHere(vm: VmInstance): Promise<void> {
    if (vm.qemu) await dropStaleRelays(vm.qemu.qmp, vm.config.nics?.length ?? 0, vm.log);
    await this.openPass(vm);
  }

  /** Close the VM's ports; `remove` also deletes their TAPs (the VM is not going to run here). */
  async close(vm: string, remove: boolean): Promise<void> {
    const ports = this.#ports.get(vm);
    if (!ports) return;
    this.#ports.delete(vm);
    for (const p of ports) await p.close(remove);
  }
}
