/**
 * QEMU command line for a tether VM. Pure.
 *
 * S and D must build the same device model, so everything comes from VmConfig; only the
 * per-host paths and the incoming mode differ. Guest RAM is a shared file
 * (memory-backend-file, share=on): it survives QEMU restarts, and the sidecar reads and
 * writes guest memory through it.
 */
import type { VmConfig } from '../config/types.ts';
import { TetherError } from '../errors.ts';

export interface QemuPaths {
  /** Guest RAM file (on tmpfs). Must already be sized or QEMU creates/extends it. */
  ramFile: string;
  qmpSocket: string;
  /** Serial console output, appended to. */
  serialLog: string;
  /** The persistent TAP QEMU opens for NIC i (created by the sidecar, see src/net/tap.ts). */
  nicTaps?: readonly string[];
  /**
   * The destination's post-copy window only: NIC i's guest→wire frames are redirected to
   * the sidecar's relay (QEMU listens on both sockets; docs/network.md "The window").
   */
  nicRelays?: readonly NicRelayPaths[];
  /**
   * The disk's post-copy window on the destination (docs/disk.md): QEMU reads and writes the
   * disk through the sidecar's NBD server on this socket (its block-write journal). Absent:
   * QEMU opens the image itself (a `file` node), the VM's steady state.
   */
  nbdSocket?: string;
}

/** The two unix sockets of one NIC's relay: QEMU writes the guest's frames to `out`, reads released ones from `in`. */
export interface NicRelayPaths {
  in: string;
  out: string;
}

/** QOM/chardev ids of NIC i's relay (the sidecar's detach deletes them by these names). */
export const relayIds = (i: number) => ({ inDev: `nin${i}`, outDev: `nout${i}`, inFilter: `nrin${i}`, outFilter: `nrout${i}` });

export type QemuIncoming =
  /** Wait for `migrate-incoming` over QMP (destination of a live migration). */
  | { kind: 'defer' }
  /**
   * Load device state only from `file` (written by `xen-save-devices-state`), keep RAM as it
   * is in the RAM file, then run. This is the rollback restore on S.
   */
  | { kind: 'exec-file'; file: string };

/**
 * QEMU's option parser (QemuOpts) splits on ',' and takes ',,' as a literal comma. Values
 * given to "key=value,..." options must be escaped; plain options (-kernel, -append,
 * -incoming, -name's implicit guest=) differ, see below.
 */
export function qemuOptValue(v: string): string {
  return v.replaceAll(',', ',,');
}

/** POSIX sh single-quoting: '...' with each ' written as '\'' */
export function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

export function buildQemuArgs(vm: VmConfig, paths: QemuPaths, incoming?: QemuIncoming): string[] {
  const mem = `${vm.memoryMiB}M`;
  const args: string[] = [
    // -name is QemuOpts with an implied "guest=" key; config validation keeps commas out,
    // escape anyway.
    '-name',
    qemuOptValue(vm.name),
    '-accel',
    vm.qemu.accel,
    '-machine',
    `${vm.qemu.machine},memory-backend=ram0`,
    '-object',
    `memory-backend-file,id=ram0,size=${mem},mem-path=${qemuOptValue(paths.ramFile)},share=on`,
    '-m',
    mem,
    '-smp',
    String(vm.cpus),
    '-cpu',
    vm.qemu.cpu,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
  ];
  // -kernel/-initrd/-append are stored verbatim (no QemuOpts parsing): no escaping.
  // A VM without kernel boots from firmware only (used by tests that need no guest).
  if (vm.kernel !== '') {
    args.push('-kernel', vm.kernel);
    if (vm.initrd !== undefined && vm.initrd !== '') args.push('-initrd', vm.initrd);
    if (vm.append !== '') args.push('-append', vm.append);
  }
  args.push(
    '-chardev',
    `socket,id=qmp0,path=${qemuOptValue(paths.qmpSocket)},server=on,wait=off`,
    '-mon',
    'chardev=qmp0,mode=control',
    '-chardev',
    `file,id=ser0,path=${qemuOptValue(paths.serialLog)},append=on`,
    '-serial',
    'chardev:ser0',
  );
  args.push(...nicArgs(vm, paths));
  if (vm.disk) args.push(...diskArgs(vm, paths));
  if (incoming?.kind === 'defer') {
    args.push('-incoming', 'defer');
  } else if (incoming?.kind === 'exec-file') {
    // "exec:<cmd>" runs <cmd> through /bin/sh -c. The file is device state only, so the
    // stream carries no configuration section: tell QEMU not to expect one. -S: the restored
    // VM stays paused after loading until the sidecar says `cont` (and then announces it).
    args.push('-S', '-incoming', `exec:cat ${shellQuote(incoming.file)}`, '-global', 'migration.send-configuration=off');
  }
  args.push(...vm.qemu.extraArgs);
  return args;
}

/**
 * Guest NICs: QEMU's own tap backend with the virtio-net header (checksum and
 * segmentation offloads) on the persistent TAP the sidecar created in the bridge; no
 * guest frame passes through the sidecar. Only inside the destination's window, two
 * filter-redirectors send the guest's frames through the sidecar's relay: r1 (indev,
 * frames the gate released → tap) must be created BEFORE r0 (outdev: the guest's frames →
 * relay): rx filters are walked last to first, the other order loops frames forever.
 */
function nicArgs(vm: VmConfig, paths: QemuPaths): string[] {
  const args: string[] = [];
  (vm.nics ?? []).forEach((nic, i) => {
    const tap = paths.nicTaps?.[i];
    if (tap === undefined) throw new TetherError('ERR_CONFIG_INVALID', `nics[${i}]: no TAP name given`, { field: `nics[${i}]` });
    args.push(
      '-netdev',
      `tap,id=net${i},ifname=${qemuOptValue(tap)},script=no,downscript=no,vnet_hdr=on`,
      '-device',
      `virtio-net-pci,netdev=net${i},mac=${nic.mac},id=nic${i}`,
    );
    const relay = paths.nicRelays?.[i];
    if (relay) {
      const id = relayIds(i);
      args.push(
        '-chardev',
        `socket,id=${id.inDev},path=${qemuOptValue(relay.in)},server=on,wait=off`,
        '-chardev',
        `socket,id=${id.outDev},path=${qemuOptValue(relay.out)},server=on,wait=off`,
        '-object',
        `filter-redirector,id=${id.inFilter},netdev=net${i},queue=rx,indev=${id.inDev},vnet_hdr_support=on`,
        '-object',
        `filter-redirector,id=${id.outFilter},netdev=net${i},queue=rx,outdev=${id.outDev},vnet_hdr_support=on`,
      );
    }
  });
  return args;
}

/** The guest disk's top node (raw format): the device's drive=, the same on every QEMU of the VM. */
export const DISK_NODE = 'disk0';
/** Its protocol child in steady state: QEMU's own file I/O on the image. */
export const FILE_NODE = 'f0';
/** Its protocol child inside the destination's post-copy window: the sidecar's NBD server. */
export const NBD_NODE = 'nbd0';

/**
 * Options of the steady-state protocol node, as -blockdev keys; the destination's switch at
 * completion (qemu/disk-switch.ts, for VmInstance.detachDiskWindow) adds the same node over
 * QMP. `cache.direct`: O_DIRECT, no host page cache between QEMU and the shared image (another
 * host, or this host's sidecar, writes it between two QEMUs of the VM); the raw format above
 * it caches nothing either.
 */
export function fileNodeOptions(image: string): {
  driver: 'file';
  'node-name': string;
  filename: string;
  cache: { direct: true };
  discard: 'unmap';
} {
  return { driver: 'file', 'node-name': FILE_NODE, filename: image, cache: { direct: true }, discard: 'unmap' };
}

/** The raw node over `child` (FILE_NODE or NBD_NODE), as blockdev-reopen takes it. */
export function rawNodeOptions(child: string): { driver: 'raw'; 'node-name': string; file: string; discard: 'unmap' } {
  return { driver: 'raw', 'node-name': DISK_NODE, file: child, discard: 'unmap' };
}

/**
 * The guest disk: a raw node `disk0` under a virtio-blk-pci device, over one of two
 * protocol nodes:
 *   steady state   `f0`, driver=file on the image with cache.direct=on: QEMU's own I/O, no
 *                  byte through the sidecar (a sidecar restart changes nothing the guest sees)
 *   window (D)     `nbd0`, QEMU's NBD client on the sidecar's unix socket (the block-write
 *                  journal); `reconnect-delay` holds the guest's I/O while the sidecar
 *                  restarts. The export name is the VM's name.
 * The device and its drive= are the same in both, so S (file) migrates to D (nbd); at
 * completion D reopens disk0 over a file node and deletes nbd0. `discard=unmap` on every
 * node passes the guest's discards on (NBD TRIM in the window, a hole punch on the file).
 */
function diskArgs(vm: VmConfig, paths: QemuPaths): string[] {
  const disk = vm.disk!;
  let child: string;
  if (paths.nbdSocket !== undefined) {
    child = [
      'driver=nbd',
      `node-name=${NBD_NODE}`,
      'server.type=unix',
      `server.path=${qemuOptValue(paths.nbdSocket)}`,
      `export=${qemuOptValue(vm.name)}`,
      `reconnect-delay=${disk.reconnectDelaySec}`,
      'discard=unmap',
    ].join(',');
  } else {
    child = ['driver=file', `node-name=${FILE_NODE}`, `filename=${qemuOptValue(disk.image)}`, 'cache.direct=on', 'discard=unmap'].join(',');
  }
  const raw = [
    'driver=raw',
    `node-name=${DISK_NODE}`,
    `file=${paths.nbdSocket !== undefined ? NBD_NODE : FILE_NODE}`,
    'discard=unmap',
  ].join(',');
  return ['-blockdev', child, '-blockdev', raw, '-device', `virtio-blk-pci,drive=${DISK_NODE},id=vda`];
}
