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
  /**
   * Where this host finds `<vm>.yaml` for an incoming migration: the destination builds
   * QEMU's command line from its own file, never from what the peer sends. Default /etc/tether/vms
   */
  vmConfigDir: string;
  /**
   * Directory of the destination journal's write-ahead logs (one file per VM per
   * migration), on storage local to this host. The loader fills it: default
   * <stateDir>/journal (literal configs may omit it).
   */
  journalDir?: string;
  peer: {
    /** host:port the checkpoint/peer channel listens on. */
    listen: { host: string; port: number };
    /** Pre-shared key (>= 32 bytes) authenticating peers; read from keyFile or given inline (base64). */
    key: Buffer;
    /**
     * How long a connection to the peer port may take to authenticate before it is dropped,
     * and the most connections that may be unauthenticated at once (more are closed at
     * accept). The loader always fills both; literal configs may omit them (PEER_DEFAULTS).
     */
    handshakeTimeoutMs?: number;
    maxUnauthenticated?: number;
  };
  migration: {
    /** Address peers' QEMU connect to for the incoming migration stream on this host. */
    listenHost: string;
    /** Ports used for incoming QEMU migration streams. */
    portRange: [number, number];
  };
  /** Optional Prometheus metrics listener. */
  metrics?: { host: string; port: number };
  /**
   * QEMU in a transient systemd scope per VM (src/qemu/scope.ts, docs/deploy.md); absent:
   * scope auto, slice machine.slice.
   */
  systemd?: { scope: 'auto' | 'always' | 'never'; slice: string };
  logLevel: 'debug' | 'info' | 'warn' | 'error';
}

/** One guest NIC: virtio-net on QEMU's tap backend, on a TAP the sidecar creates in the host bridge. */
export interface NicConfig {
  /** Guest MAC, lower-case "52:54:00:12:34:56"; identical on both hosts. */
  mac: string;
  /** Host bridge the TAP joins. */
  bridge: string;
  /** TAP device name (<= 15 bytes). */
  tap: string;
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
    /** Native threads hashing/scanning guest RAM (S's baseline, D's collect); host-local, not compared. */
    hashThreads: number;
    /**
     * Checkpoints in flight at once (taken by D, not yet acknowledged by S). D uses the
     * smaller of its own and the source's (sent in `prepare`); S refuses more. Host-local.
     */
    window: number;
  };
  /** The VM's disk, served to QEMU by the sidecar's NBD server (absent: no disk). */
  disk?: DiskConfig;
  migration: {
    /** Time spent in pre-copy before switching to post-copy (0 = switch as soon as QEMU allows). */
    precopyMs: number;
    /** QEMU max-bandwidth for the migration stream, bytes/s (0 = QEMU default). */
    maxBandwidth: number;
    /** Keep a standby QEMU ready on the source during a migration, for a fast rollback. */
    hotStandby: boolean;
  };
  /** Guest NICs, in PCI order: NIC i is QEMU netdev net<i> (a tap; docs/network.md). */
  nics?: NicConfig[];
  /** Bound of frames held per NIC by the destination's gate (the loader always fills both; literal configs may omit them). */
  gate?: { maxBytes: number; maxFrames: number };
}

export interface DiskConfig {
  /** Raw image on storage both hosts reach; its length is the disk size. */
  image: string;
  /** Bound of journaled write bytes on the destination before guest writes are delayed. */
  journalMaxBytes: number;
  /** Size at which D's write-ahead log starts a new segment (at a barrier); acknowledged segments are deleted. */
  journalSegmentBytes: number;
  /** D's NBD reconnect-delay inside the post-copy window (the only time QEMU reads the disk through the sidecar), seconds. */
  reconnectDelaySec: number;
}
