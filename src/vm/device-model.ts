/**
 * The device-model digest: what must be identical on both hosts for QEMU's
 * migration stream (and tether's RAM file and checkpoints) to fit, hashed.
 *
 * The source sends it in `prepare`; the destination computes it over its OWN
 * config of the VM and refuses the migration when the two differ. Host-local
 * facts are left out on purpose, so that each host may keep its own: paths
 * (qemu.binary, kernel, initrd, images, sockets), the kernel command line (only
 * read at boot), QEMU's extraArgs (host-specific tuning; a device they add on
 * one side only still fails QEMU's own stream load, which rolls back), and the
 * checkpoint and migration tuning.
 *
 * Canonical form: the JSON text of an object with a fixed key order (below),
 * version-tagged so that a future field changes every digest instead of
 * silently matching an old peer. NICs count by their MACs (in order) and the
 * disk by its presence: not bridges, TAP names or image paths. The image is one
 * shared file, so its size is the same for both hosts by construction.
 */
import { createHash } from 'node:crypto';
import type { VmConfig } from '../config/types.ts';

const DIGEST_VERSION = 2;

/** The canonical text the digest is taken over (exported for tests and for logs on mismatch). */
export function deviceModelText(vm: VmConfig): string {
  return JSON.stringify({
    v: DIGEST_VERSION,
    name: vm.name,
    accel: vm.qemu.accel,
    machine: vm.qemu.machine,
    cpu: vm.qemu.cpu,
    memoryMiB: vm.memoryMiB,
    cpus: vm.cpus,
    nics: (vm.nics ?? []).map((n) => n.mac),
    disk: vm.disk !== undefined,
  });
}

/** sha256 (lowercase hex) of deviceModelText. */
export function deviceModelDigest(vm: VmConfig): string {
  return createHash('sha256').update(deviceModelText(vm)).digest('hex');
}
