/** Validated configuration shapes. The YAML loader (load.ts) produces these. */

export type DirtyTrackerKind = 'auto' | 'scan' | 'soft-dirty';

export interface HostConfig {
  /** Host name, used in logs and metrics. */
  name: string;
  /** Per-VM state (serial log, device state, checkpoint stage, applied record): <stateDir>/<vm>/ */
  stateDir: string;
  /** Directory for guest RAM files; must be shared memory (tmpfs) for post-copy: default /dev/shm/tether/<name> */
  ramDir: string;
  /** Unix socket the CLI talks to. */
  controlSocket: string;
  peer: {
    /** host:port the checkpoint/peer channel listens on. */
    listen: { host: string; port: number };
    /** Pre-shared key (>= 32 bytes) authenticating peers; read from keyFile or given inline (base64). */
    key: Buffer;
  };
  migration: {
    /** Address peers' QEMU connect to for the incoming migration stream on this host. */
    listenHost: string;
    /** Ports used for incoming QEMU migration streams. */
    portRange: [number, number];
  };
  /** Optional Prometheus metrics listener. */
  metrics?: { host: string; port: number };
  logLevel: 'debug' | 'info' | 'warn' | 'error';
}

export interface VmConfig {
  name: string;
  qemu: {
    binary: string;
    accel: 'tcg' | 'kvm';
    machine: string;
    cpu: string;
    extraArgs: string[];
  };
  memoryMiB: number;
  cpus: number;
  kernel: string;
  initrd?: string;
  append: string;
  checkpoint: {
    intervalMs: number;
    failoverTimeoutMs: number;
    fenceTimeoutMs: number;
    dirtyTracker: DirtyTrackerKind;
  };
  migration: {
    /** Time spent in pre-copy before switching to post-copy (0 = switch as soon as QEMU allows). */
    precopyMs: number;
    /** QEMU max-bandwidth for the migration stream, bytes/s (0 = QEMU default). */
    maxBandwidth: number;
    /** Keep a standby QEMU ready on the source during a migration, for a fast rollback. */
    hotStandby: boolean;
  };
}
