/**
 * What `tether check` reports (CheckResult) and what it asks of the host (CheckEnv: every
 * probe that touches the OS, faked in check.test.ts; the real one is env.ts).
 */
import type { HostConfig } from '../config/types.ts';
import type { ErrorCode } from '../errors.ts';

export type CheckStatus = 'ok' | 'fail' | 'skip';

export interface CheckResult {
  /** What was checked: "ramDir", "vm vm1: bridge br-guest", "qemu qemu-system-x86_64", ... */
  name: string;
  status: CheckStatus;
  /** Set when status is fail. */
  code?: ErrorCode;
  message: string;
}

/** A minimal stat: what the checks need of a path. */
export interface PathInfo {
  kind: 'file' | 'dir' | 'block' | 'char' | 'socket' | 'other';
  mode: number;
  uid: number;
  size: number;
  /** Bytes actually allocated (st_blocks * 512). */
  allocated: number;
}

export interface QemuVersion {
  major: number;
  minor: number;
  micro: number;
  package: string;
}

/** What a throwaway QEMU told about itself over QMP (see env.ts qemuQmp). */
export interface QemuProbe {
  commands: string[];
  migrationCapabilities: string[];
  /** Error QEMU gave when asked to enable postcopy-ram as an incoming VM (null: accepted). */
  postcopyError: string | null;
}

export interface CheckEnv {
  /** lstat-like; null when the path does not exist. */
  stat(p: string): PathInfo | null;
  /** errno code of access(p, mode) ('EACCES', ...), null when allowed. */
  access(p: string, mode: 'r' | 'rw'): string | null;
  /** statfs: file system magic and bytes available to this user. */
  statfs(p: string): { type: number; free: number };
  /** The link's kind ('bridge', 'veth', '' for a plain device), or null when there is no such link. */
  linkKind(name: string): Promise<string | null>;
  /** errno code of opening a character device read-write (then closed), null when it opened. */
  openDevice(p: string): string | null;
  /** errno code of the non-blocking OFD read-lock probe on a disk image (see ofdLockProbe), null when granted. */
  lockProbe(p: string): string | null;
  /** errno code of opening a disk image read-only with O_DIRECT (then closed), null when it opened. */
  directProbe(p: string): string | null;
  /** `binary --version`, parsed; throws with the reason it could not run or parse it. */
  qemuVersion(binary: string): Promise<QemuVersion>;
  /** A throwaway `-machine none -incoming defer` QEMU asked over QMP; throws with the reason it could not. */
  qemuQmp(binary: string): Promise<QemuProbe>;
  /** Whether soft-dirty tracking works (the daemon's own probe), and why not. */
  softDirty(): { supported: boolean; why: string };
  /** errno code of binding a TCP socket to host:0, null when it bound. */
  bindProbe(host: string): Promise<string | null>;
  /** Authenticated peer handshake; throws the TetherError of the failure. */
  peerProbe?(host: string, port: number, key: Buffer): Promise<void>;
  /**
   * How the daemon would start QEMU (src/qemu/scope.ts resolveScope): the slice when in
   * scopes, null (with the reason) when not; throws ERR_QEMU_SCOPE for scope always without them.
   */
  scope(cfg: HostConfig['systemd']): Promise<{ slice: string | null; why: string }>;
  /** /proc/sys/vm/unprivileged_userfaultfd, null when absent. */
  readSysctl(name: string): string | null;
  euid: number;
}

export interface CheckOptions {
  /** The host config. */
  config: string;
  /** VM configs checked in addition to those in the host's vmConfigDir. */
  vmFiles?: readonly string[];
  /** Peers ("host:port") to reach with an authenticated handshake. */
  peers?: readonly string[];
}
