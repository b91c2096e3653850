/**
 * The YAML a Cluster writes: each host's sidecar config and the VM config (both hosts hold
 * the same VM file), from ClusterOptions. prepareDisk also creates the VM's disk image in
 * the cluster directory (the shared storage both namespaces see).
 */
import fs from 'node:fs';
import path from 'node:path';
import { sh } from './proc.ts';
import { GUEST, GUEST_BRIDGE, GUEST_IP, GUEST_MAC, GUEST_TAP, NETCHECK_PORT, type ClusterOptions, type Host } from './topology.ts';

/**
 * TETHER_TEST_FAST=1: make every scenario's machine effectively faster, to show that no
 * scenario depends on the machine being slow: the migration link unshaped (maxBandwidth 0)
 * and a 256 MiB guest, unless the test sets them itself.
 */
const FAST = process.env.TETHER_TEST_FAST === '1';

/** Host `h`'s sidecar config (keyFile: the peer key it authenticates with). */
export function hostYaml(h: Host, keyFile: string): string {
  return [
    `name: ${h.name}`,
    `stateDir: ${h.stateDir}`,
    `ramDir: ${h.ramDir}`,
    `controlSocket: ${h.socket}`,
    `vmConfigDir: ${h.vmConfigDir}`,
    `peer:`,
    `  listen: "${h.addr}:7700"`,
    `  keyFile: ${keyFile}`,
    `migration:`,
    `  listenHost: ${h.addr}`,
    `  portRange: [49152, 49160]`,
    `metrics: "${h.addr}:9700"`,
    `logLevel: debug`,
    '',
  ].join('\n');
}

/**
 * With opts.disk: create the disk image and return the guest program the kernel command line
 * runs (tether.run=) and the VM config's disk lines; without: memcheck, no disk lines.
 */
export function prepareDisk(opts: ClusterOptions, diskImage: string): { run: string; diskYaml: string[] } {
  const v = opts.vm ?? {};
  const disk = opts.disk;
  let run = `memcheck:${v.memcheckMiB ?? 96}:${v.memcheckMBps ?? 32}`;
  const diskYaml: string[] = [];
  if (!disk) return { run, diskYaml };
  fs.mkdirSync(path.dirname(diskImage), { recursive: true });
  if (disk.guest === 'os') {
    if (!disk.image) throw new Error("disk.guest 'os' needs disk.image");
    sh('cp', ['--sparse=always', disk.image, diskImage]);
  } else {
    fs.writeFileSync(diskImage, '');
    fs.truncateSync(diskImage, (disk.mib ?? 16) * 1024 * 1024);
  }
  if (disk.guest === 'os') {
    // the guest runs what its own image starts
  } else if (disk.guest === 'fsload') {
    sh('mkfs.ext4', ['-q', '-F', '-b', '4096', diskImage]);
    run = 'fsload:/dev/vda:8:64';
  } else if (disk.guest === 'diskbench') {
    run = `diskbench:/dev/vda:${disk.benchSpanMiB ?? 64}:${disk.benchOps ?? 2000}${disk.benchTrigger ? ':trigger' : ''}`;
  } else {
    // Dense writes, quick verification: most of the guest's time is spent writing, so
    // every epoch (the one a rollback discards included) holds writes.
    run = `diskcheck:/dev/vda:${disk.blocks ?? 512}:${disk.writesPerPass ?? 64}:${disk.delayMs ?? 1}${disk.zeroEvery ? `:${disk.zeroEvery}` : ''}`;
  }
  if (!disk.direct) {
    diskYaml.push(
      'disk:',
      `  image: ${diskImage}`,
      `  journalMaxBytes: ${disk.journalMaxBytes ?? 64 * 1024 * 1024}`,
      ...(disk.journalSegmentBytes ? [`  journalSegmentBytes: ${disk.journalSegmentBytes}`] : []),
    );
  }
  return { run, diskYaml };
}

/** The VM config's qemu.extraArgs / nics / gate lines for opts.guestNet and opts.disk.direct. */
export function nicYaml(opts: ClusterOptions, diskImage: string): string[] {
  const nic: string[] = [];
  if (opts.disk?.direct) {
    if (opts.guestNet === 'qemu-tap') throw new Error('disk.direct and guestNet qemu-tap both need qemu.extraArgs');
    nic.push(
      'qemu:',
      '  extraArgs:',
      '    - "-blockdev"',
      `    - "driver=file,node-name=disk0,filename=${diskImage},cache.direct=on,discard=unmap"`,
      '    - "-device"',
      '    - "virtio-blk-pci,drive=disk0,id=vda"',
    );
  }
  if (opts.guestNet === 'qemu-tap') {
    nic.push(
      'qemu:',
      '  extraArgs:',
      '    - "-netdev"',
      `    - "tap,id=net0,ifname=${GUEST_TAP},script=no,downscript=no${opts.tapVnetHdr === false ? ',vnet_hdr=off' : ''}"`,
      '    - "-device"',
      `    - "virtio-net-pci,netdev=net0,mac=${GUEST_MAC}"`,
    );
  } else if (opts.guestNet === 'gate') {
    nic.push('nics:', `  - mac: "${GUEST_MAC}"`, `    bridge: ${GUEST_BRIDGE}`, `    tap: ${GUEST_TAP}`);
    const g = opts.gate ?? {};
    if (g.maxBytes !== undefined || g.maxFrames !== undefined) {
      nic.push('gate:');
      if (g.maxBytes !== undefined) nic.push(`  maxBytes: ${g.maxBytes}`);
      if (g.maxFrames !== undefined) nic.push(`  maxFrames: ${g.maxFrames}`);
    }
  }
  return nic;
}

/** The VM config of a cluster (prepares its disk image first, see prepareDisk). */
export function vmYaml(opts: ClusterOptions, vmName: string, diskImage: string): string {
  const v = opts.vm ?? {};
  const { run, diskYaml } = prepareDisk(opts, diskImage);
  const boot = opts.boot;
  const net = opts.guestNet ? ` tether.ip=${GUEST_IP}/24${boot ? '' : ` tether.netcheck=${NETCHECK_PORT}`}` : '';
  return [
    `name: ${vmName}`,
    `memoryMiB: ${v.memoryMiB ?? (FAST ? 256 : 512)}`,
    `kernel: ${boot?.kernel ?? path.join(GUEST, 'vmlinuz')}`,
    `initrd: ${boot?.initrd ?? path.join(GUEST, 'initrd.img')}`,
    // a JSON string is a YAML double-quoted scalar: quotes in the extra parameters survive
    `append: ${JSON.stringify(`${boot?.append ?? `console=ttyS0 quiet panic=-1 tether.run=${run}`}${net}${v.appendExtra ? ` ${v.appendExtra}` : ''}`)}`,
    ...nicYaml(opts, diskImage),
    `checkpoint:`,
    `  intervalMs: ${v.intervalMs ?? 50}`,
    `  failoverTimeoutMs: ${v.failoverTimeoutMs ?? 8000}`,
    `  fenceTimeoutMs: ${v.fenceTimeoutMs ?? 4000}`,
    `migration:`,
    `  maxBandwidth: ${v.maxBandwidth ?? (FAST ? 0 : 16 * 1024 * 1024)}`,
    `  hotStandby: ${v.hotStandby ?? true}`,
    ...(v.extraYaml ?? []),
    ...diskYaml,
    '',
  ].join('\n');
}
