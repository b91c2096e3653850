/**
 * The lab's fixed names: where the repository, the tether CLI and the busybox guest are, the
 * guest segment's addresses and device names (every cluster's segment lives in namespaces of
 * its own, so they never clash), and the shapes a Cluster is described by (Host,
 * ClusterOptions). No behaviour: lab/cluster.ts builds from these.
 */
import type { ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** The tether CLI every sidecar and `tether` call runs. */
export const TETHER = path.join(ROOT, 'bin', 'tether.mjs');
export const GUEST = path.join(ROOT, '.cache', 'guest', 'current');

export interface Host {
  role: 'source' | 'destination';
  name: string;
  ns: string;
  addr: string;
  config: string;
  socket: string;
  stateDir: string;
  ramDir: string;
  /** This host's VM configs (<vmConfigDir>/vm1.yaml): a destination runs QEMU from its own. */
  vmConfigDir: string;
  daemonLog: string;
  daemon?: ChildProcess;
}

/** The guest segment: fixed, every cluster's segment lives in its own namespaces. */
export const GUEST_IP = '10.99.0.10';
export const CLIENT_IP = '10.99.0.1';
export const GUEST_MAC = '52:54:00:12:34:56';
export const NETCHECK_PORT = 7000;
export const GUEST_BRIDGE = 'brg';
export const GUEST_TAP = 'tap0';
export const SWITCH_BRIDGE = 'sw';
export const SWITCH_PORT_S = 'ups';
export const SWITCH_PORT_D = 'upd';

export interface ClusterOptions {
  /**
   * Give the guest a NIC on the guest segment and start netcheck in it.
   *   qemu-tap: QEMU's own `-netdev tap` on a TAP the cluster creates (no gate: the
   *             baseline, and a NIC whose output nobody holds back);
   *   gate:     the VM config's `nics`, served by the sidecar's gate.
   */
  guestNet?: 'qemu-tap' | 'gate';
  /**
   * With guestNet 'qemu-tap': QEMU's vnet_hdr on the TAP (default on, QEMU's own default).
   * Off, the guest gets no checksum/segmentation offloads, as behind the gate's stream
   * netdev, which carries no virtio-net header (the network benchmark's like-for-like baseline).
   */
  tapVnetHdr?: boolean;
  /** Bound of the gate's held frames (VM config `gate`), with guestNet 'gate'. */
  gate?: { maxBytes?: number; maxFrames?: number };
  /** TETHER_FAULTS for each daemon. */
  faults?: { source?: string; destination?: string };
  /**
   * The destination's sidecar runs with the fault hold-completion (src/migrate/faults.ts),
   * on every start, whatever else its TETHER_FAULTS say: a migration cannot end before
   * the test interrupts it, however fast the machine, until releaseCompletion().
   */
  holdCompletion?: boolean;
  /** Give the destination a different peer key than the source (an impostor). */
  mismatchedKeys?: boolean;
  /** Overrides merged into the VM YAML. */
  vm?: {
    memcheckMiB?: number;
    memcheckMBps?: number;
    maxBandwidth?: number;
    intervalMs?: number;
    failoverTimeoutMs?: number;
    fenceTimeoutMs?: number;
    /** Appended to the guest kernel command line (e.g. "tether.ip=10.99.0.2/24"). */
    appendExtra?: string;
    /** YAML lines appended to the VM config (e.g. a nics: block). */
    extraYaml?: string[];
    hotStandby?: boolean;
    memoryMiB?: number;
  };
  /** Extra environment for both daemons. */
  env?: Record<string, string>;
  /**
   * Boot this guest instead of the busybox one: its kernel, initrd and whole kernel command
   * line (the Debian guest of lab/apps/debian.ts, with disk.guest 'os'). With guestNet,
   * `tether.ip=GUEST_IP/24` is appended (no netcheck).
   */
  boot?: { kernel: string; initrd: string; append: string };
  /**
   * Opt-in: give the VM a raw disk image in the cluster directory (which both
   * namespaces see: the shared storage of the disk's storage model) and run a disk
   * program in the guest instead of memcheck.
   */
  disk?: {
    /**
     * diskcheck: zeroed image, `diskcheck /dev/vda <blocks> <writesPerPass> <delayMs>`; fsload: ext4 image;
     * diskbench (benchmarks): zeroed image, `diskbench /dev/vda <benchSpanMiB> <benchOps>`.
     */
    guest: 'diskcheck' | 'fsload' | 'diskbench' | 'os';
    /**
     * diskcheck: every Nth write of a pass becomes a BLKZEROOUT or BLKDISCARD of 1..4 blocks
     * (alternately), which must then read as zeroes (zero extents in the journal, DISKZERO).
     */
    zeroEvery?: number;
    /** With guest 'os': the image the VM boots from (root=/dev/vda), copied (sparse) as its disk. */
    image?: string;
    benchSpanMiB?: number;
    benchOps?: number;
    /** diskbench waits for triggerDiskbench() before its run (the image must exceed the span). */
    benchTrigger?: boolean;
    /**
     * Benchmark baseline: plain QEMU on the raw image (a file blockdev, cache.direct=on, under
     * the same virtio-blk-pci, via qemu.extraArgs) instead of tether's disk section; the VM
     * config then has no disk section. Not with guestNet 'qemu-tap'.
     */
    direct?: boolean;
    mib?: number;
    blocks?: number;
    writesPerPass?: number;
    delayMs?: number;
    journalMaxBytes?: number;
    /** disk.journalSegmentBytes of the VM config (default: half the bound). */
    journalSegmentBytes?: number;
  };
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}
