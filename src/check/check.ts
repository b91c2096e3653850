/**
 * `tether check --config <host.yaml> [<vm.yaml>...]`: everything a host needs before it can
 * run (or receive) its VMs, checked up front instead of failing in the middle of a
 * migration. Each check yields one result: ok, skip (does not apply here) or fail with a
 * code of the catalogue (src/errors.ts) — the code the daemon itself would raise where one
 * exists (ERR_CONFIG_*, ERR_LISTEN, ERR_PEER_*, ERR_MEM_SOFTDIRTY_UNSUPPORTED), else an
 * ERR_CHECK_* code.
 *
 * The checks only look: nothing is created, nothing a running daemon or QEMU holds is
 * touched (the image lock probe takes a read lock on a byte no one locks, and releases
 * it at once; the QEMU probe runs a throwaway `-machine none` QEMU). Everything that asks
 * the OS goes through CheckEnv, so the logic of each check is unit-tested with fake inputs
 * (check.test.ts) and the real environment is src/check/env.ts.
 */
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { loadHostConfig, loadVmConfig } from '../config/load.ts';
import type { HostConfig, VmConfig } from '../config/types.ts';
import { type ErrorCode, isTetherError } from '../errors.ts';
import type { CheckEnv, CheckOptions, CheckResult, PathInfo, QemuProbe, QemuVersion } from './types.ts';

// The probe interface (CheckEnv) and the result types: types.ts, re-exported for callers.
export type { CheckEnv, CheckOptions, CheckResult, CheckStatus, PathInfo, QemuProbe, QemuVersion } from './types.ts';

/** QEMU's first release with what tether needs (the post-copy fixes it relies on; filter-redirector with vnet_hdr_support). */
export const MIN_QEMU = { major: 7, minor: 2 } as const;
const TMPFS_MAGIC = 0x01021994;
const MiB = 1024 * 1024;

/**
 * Every QMP command tether sends (check.test.ts keeps this list equal to the commands
 * named in src/, so a new one cannot be forgotten here).
 */
export const QMP_COMMANDS = [
  'announce-self',
  'blockdev-add',
  'blockdev-del',
  'blockdev-reopen',
  'cont',
  'chardev-remove',
  'migrate',
  'migrate-continue',
  'migrate-incoming',
  'migrate-set-capabilities',
  'migrate-set-parameters',
  'migrate-start-postcopy',
  'migrate_cancel',
  'object-add',
  'object-del',
  'query-commands',
  'query-migrate',
  'query-migrate-capabilities',
  'query-named-block-nodes',
  'query-status',
  'quit',
  'stop',
  'xen-save-devices-state',
] as const;

/** Migration capabilities tether turns on (source.ts, destination.ts). */
export const MIGRATION_CAPABILITIES = ['postcopy-ram', 'pause-before-switchover', 'events'] as const;

/**
 * Room a VM needs in ramDir beyond its RAM file: the largest checkpoint the source stages
 * (every page, one epoch of journaled disk writes plus what QEMU had in flight, device
 * state: the bound source.ts gives its assembler) and the device-state files.
 */
export function stageReserveBytes(vm: VmConfig): number {
  const ram = vm.memoryMiB * MiB;
  const disk = vm.disk ? vm.disk.journalMaxBytes + 64 * MiB : 0;
  return ram + disk + 64 * MiB + 2 * 64 * MiB;
}

const ok = (name: string, message: string): CheckResult => ({ name, status: 'ok', message });
const skip = (name: string, message: string): CheckResult => ({ name, status: 'skip', message });
const fail = (name: string, code: ErrorCode, message: string): CheckResult => ({ name, status: 'fail', code, message });

/** Runs every check; never throws (a check that cannot run is a failure of that check). */
export async function runChecks(opts: CheckOptions, env: CheckEnv): Promise<CheckResult[]> {
  const out: CheckResult[] = [];
  let host: HostConfig;
  try {
    host = loadHostConfig(opts.config);
    out.push(ok('host config', `${path.resolve(opts.config)} (host ${host.name})`));
  } catch (e) {
    out.push(fromError('host config', e));
    return out; // nothing else can be checked without it
  }

  // A probe that throws (a tool missing, a race with the file system) fails its group of
  // checks, never the whole run.
  const group = async (name: string, fn: () => CheckResult[] | CheckResult | Promise<CheckResult[] | CheckResult>): Promise<void> => {
    try {
      const r = await fn();
      out.push(...(Array.isArray(r) ? r : [r]));
    } catch (e) {
      out.push(fromError(name, e));
    }
  };
  const vms = loadVms(host, opts.vmFiles ?? [], env, out);
  await group('directories', () => checkDirs(host, env));
  await group('listen', () => checkListen(host, env));
  await group('ramDir space', () => checkRamSpace(host, vms, env));
  for (const vm of vms) await group(`vm ${vm.name}: files`, () => checkVmFiles(vm, env));
  await group('qemu', () => checkQemu(vms, env));
  await group('bridges', () => checkBridges(vms, env));
  await group('kernel', () => checkKernel(vms, env));
  for (const vm of vms) if (vm.disk) await group(`vm ${vm.name}: disk image`, () => checkImage(vm, env));
  await group('qemu scope', () => checkScope(host, env));
  for (const p of opts.peers ?? []) await group(`peer ${p}`, () => checkPeer(host, p, env));
  return out;
}

function fromError(name: string, e: unknown): CheckResult {
  if (isTetherError(e)) return fail(name, e.code, e.message);
  return fail(name, 'ERR_INTERNAL', e instanceof Error ? e.message : String(e));
}

/** VM configs: every <vmConfigDir>/*.yaml (its name must be the file's), then the files given. */
function loadVms(host: HostConfig, extra: readonly string[], env: CheckEnv, out: CheckResult[]): VmConfig[] {
  const vms: VmConfig[] = [];
  const seen = new Set<string>();
  const dirInfo = env.stat(host.vmConfigDir);
  const files: { file: string; fromDir: boolean }[] = [];
  if (dirInfo?.kind !== 'dir') {
    out.push(
      fail(
        'vmConfigDir',
        'ERR_CHECK_PATH',
        `${host.vmConfigDir} ${dirInfo === null ? 'does not exist' : 'is not a directory'}: this host can receive no VM`,
      ),
    );
  } else {
    const names = fs
      .readdirSync(host.vmConfigDir)
      .filter((n) => n.endsWith('.yaml'))
      .sort();
    out.push(ok('vmConfigDir', `${host.vmConfigDir}: ${names.length} VM config${names.length === 1 ? '' : 's'}`));
    for (const n of names) files.push({ file: path.join(host.vmConfigDir, n), fromDir: true });
  }
  for (const f of extra) files.push({ file: path.resolve(f), fromDir: false });
  for (const { file, fromDir } of files) {
    const name = `vm config ${file}`;
    try {
      const vm = loadVmConfig(file);
      if (fromDir && `${vm.name}.yaml` !== path.basename(file)) {
        out.push(
          fail(
            name,
            'ERR_CONFIG_INVALID',
            `name: ${vm.name} must match the file name (an incoming migration of ${vm.name} looks for ${vm.name}.yaml)`,
          ),
        );
        continue;
      }
      if (seen.has(vm.name)) {
        out.push(skip(name, `VM ${vm.name} already checked`));
        continue;
      }
      seen.add(vm.name);
      vms.push(vm);
      const parts = [`VM ${vm.name}`, `${vm.memoryMiB} MiB`, `${vm.nics?.length ?? 0} NIC(s)`, vm.disk ? 'a disk' : 'no disk'];
      out.push(ok(name, parts.join(', ')));
    } catch (e) {
      out.push(fromError(name, e));
    }
  }
  return vms;
}

/** The nearest existing ancestor of `p` (p itself when it exists). */
function existingAncestor(p: string, env: CheckEnv): string {
  let cur = path.resolve(p);
  while (env.stat(cur) === null) {
    const up = path.dirname(cur);
    if (up === cur) break;
    cur = up;
  }
  return cur;
}

/** A directory the daemon creates if missing: it must be one, or be creatable, and writable. */
function writableDir(name: string, dir: string, env: CheckEnv): CheckResult {
  const info = env.stat(dir);
  if (info !== null && info.kind !== 'dir') return fail(name, 'ERR_CHECK_PATH', `${dir} exists and is not a directory`);
  const at = info === null ? existingAncestor(dir, env) : dir;
  const atInfo = env.stat(at);
  if (atInfo?.kind !== 'dir') return fail(name, 'ERR_CHECK_PATH', `${dir} cannot be created: ${at} is not a directory`);
  const err = env.access(at, 'rw');
  if (err !== null) return fail(name, 'ERR_CHECK_PATH', `${at} is not writable (${err})${at === dir ? '' : `: ${dir} cannot be created`}`);
  return ok(name, info === null ? `${dir} (created at start, under ${at})` : dir);
}

function checkDirs(host: HostConfig, env: CheckEnv): CheckResult[] {
  const out = [writableDir('stateDir', host.stateDir, env), writableDir('control socket directory', path.dirname(host.controlSocket), env)];
  const ram = writableDir('ramDir', host.ramDir, env);
  if (ram.status !== 'ok') return [...out, ram];
  const at = existingAncestor(host.ramDir, env);
  const fsType = env.statfs(at).type;
  if (fsType !== TMPFS_MAGIC) {
    return [
      ...out,
      fail(
        'ramDir',
        'ERR_CHECK_RAM_DIR',
        `${host.ramDir} is on a file system of type 0x${fsType.toString(16)}, not tmpfs: guest RAM must be shared memory that outlives QEMU`,
      ),
    ];
  }
  return [...out, ok('ramDir', `${host.ramDir} on tmpfs`)];
}

/** The addresses the daemon listens on must be this host's (bound at port 0: no conflict with a running daemon). */
async function checkListen(host: HostConfig, env: CheckEnv): Promise<CheckResult[]> {
  const addrs = new Map<string, string>();
  addrs.set(host.peer.listen.host, 'peer.listen');
  if (!addrs.has(host.migration.listenHost)) addrs.set(host.migration.listenHost, 'migration.listenHost');
  if (host.metrics && !addrs.has(host.metrics.host)) addrs.set(host.metrics.host, 'metrics');
  const out: CheckResult[] = [];
  for (const [addr, field] of addrs) {
    const err = await env.bindProbe(addr);
    out.push(
      err === null
        ? ok(`listen ${field}`, `${addr} is an address of this host`)
        : fail(`listen ${field}`, 'ERR_LISTEN', `cannot bind ${addr} (${err}): not an address of this host`),
    );
  }
  return out;
}

/**
 * Free room on ramDir's tmpfs for every VM's RAM file (what is not allocated yet: a
 * running VM's file already holds its share) and its checkpoint stage.
 */
function checkRamSpace(host: HostConfig, vms: VmConfig[], env: CheckEnv): CheckResult[] {
  if (vms.length === 0) return [skip('ramDir space', 'no VM configured')];
  const at = existingAncestor(host.ramDir, env);
  const { free } = env.statfs(at);
  let need = 0;
  for (const vm of vms) {
    const ram = vm.memoryMiB * MiB;
    const file = env.stat(path.join(host.ramDir, `${vm.name}.ram`));
    need += Math.max(0, ram - (file?.allocated ?? 0)) + stageReserveBytes(vm);
  }
  const msg = `${mib(free)} MiB free, ${mib(need)} MiB needed (RAM files not yet allocated + the largest checkpoint stage of each VM)`;
  return [need > free ? fail('ramDir space', 'ERR_CHECK_SPACE', msg) : ok('ramDir space', msg)];
}

const mib = (n: number): string => (n / MiB).toFixed(0);

function checkVmFiles(vm: VmConfig, env: CheckEnv): CheckResult[] {
  const out: CheckResult[] = [];
  for (const [field, p] of [
    ['kernel', vm.kernel],
    ['initrd', vm.initrd],
  ] as const) {
    if (p === undefined || p === '') continue;
    const name = `vm ${vm.name}: ${field}`;
    const info = env.stat(p);
    if (info?.kind !== 'file') out.push(fail(name, 'ERR_CHECK_PATH', `${p} ${info === null ? 'does not exist' : 'is not a file'}`));
    else {
      const err = env.access(p, 'r');
      out.push(err === null ? ok(name, p) : fail(name, 'ERR_CHECK_PATH', `${p} is not readable (${err})`));
    }
  }
  return out;
}

/** Each distinct QEMU binary: version >= 7.2, the QMP commands and capabilities tether uses, post-copy (userfaultfd). */
async function checkQemu(vms: VmConfig[], env: CheckEnv): Promise<CheckResult[]> {
  if (vms.length === 0) return [skip('qemu', 'no VM configured')];
  const out: CheckResult[] = [];
  for (const binary of [...new Set(vms.map((v) => v.qemu.binary))]) {
    let v: QemuVersion;
    try {
      v = await env.qemuVersion(binary);
    } catch (e) {
      out.push(fail(`qemu ${binary}`, 'ERR_CHECK_QEMU', `cannot run ${binary}: ${e instanceof Error ? e.message : String(e)}`));
      continue;
    }
    const vs = `${v.major}.${v.minor}.${v.micro}${v.package ? ` (${v.package})` : ''}`;
    if (v.major < MIN_QEMU.major || (v.major === MIN_QEMU.major && v.minor < MIN_QEMU.minor)) {
      out.push(fail(`qemu ${binary}`, 'ERR_CHECK_QEMU', `version ${vs} is older than ${MIN_QEMU.major}.${MIN_QEMU.minor}`));
      continue;
    }
    out.push(ok(`qemu ${binary}`, `version ${vs}`));
    let p: QemuProbe;
    try {
      p = await env.qemuQmp(binary);
    } catch (e) {
      out.push(
        fail(`qmp ${binary}`, 'ERR_CHECK_QMP', `a throwaway QEMU did not answer over QMP: ${e instanceof Error ? e.message : String(e)}`),
      );
      continue;
    }
    const missingCmds = QMP_COMMANDS.filter((c) => !p.commands.includes(c));
    const missingCaps = MIGRATION_CAPABILITIES.filter((c) => !p.migrationCapabilities.includes(c));
    if (missingCmds.length > 0 || missingCaps.length > 0) {
      const what = [
        ...(missingCmds.length ? [`commands ${missingCmds.join(', ')}`] : []),
        ...(missingCaps.length ? [`migration capabilities ${missingCaps.join(', ')}`] : []),
      ];
      out.push(fail(`qmp ${binary}`, 'ERR_CHECK_QMP', `QEMU lacks ${what.join(' and ')}`));
    } else {
      out.push(ok(`qmp ${binary}`, `${QMP_COMMANDS.length} commands and ${MIGRATION_CAPABILITIES.length} migration capabilities present`));
    }
    if (p.postcopyError !== null) {
      const sysctl = env.readSysctl('vm/unprivileged_userfaultfd');
      out.push(
        fail(
          `post-copy ${binary}`,
          'ERR_CHECK_KERNEL',
          `QEMU refuses post-copy on this host: ${p.postcopyError} (userfaultfd; vm.unprivileged_userfaultfd=${sysctl ?? 'absent'}, euid ${env.euid})`,
        ),
      );
    } else {
      out.push(ok(`post-copy ${binary}`, 'QEMU accepts postcopy-ram as a destination (userfaultfd works)'));
    }
  }
  return out;
}

async function checkBridges(vms: VmConfig[], env: CheckEnv): Promise<CheckResult[]> {
  const out: CheckResult[] = [];
  const bridges = new Map<string, string[]>();
  for (const vm of vms) for (const n of vm.nics ?? []) bridges.set(n.bridge, [...(bridges.get(n.bridge) ?? []), vm.name]);
  for (const [br, users] of bridges) {
    const name = `bridge ${br}`;
    const kind = await env.linkKind(br);
    if (kind === null) out.push(fail(name, 'ERR_CHECK_BRIDGE', `no link ${br} on this host (NICs of ${users.join(', ')})`));
    else if (kind !== 'bridge') out.push(fail(name, 'ERR_CHECK_BRIDGE', `${br} is a ${kind || 'plain'} link, not a bridge`));
    else out.push(ok(name, `bridge for ${users.join(', ')}`));
  }
  return out;
}

function checkKernel(vms: VmConfig[], env: CheckEnv): CheckResult[] {
  const out: CheckResult[] = [];
  if (vms.some((v) => (v.nics?.length ?? 0) > 0)) {
    const err = env.openDevice('/dev/net/tun');
    out.push(
      err === null
        ? ok('kernel: TUN', '/dev/net/tun opens')
        : fail('kernel: TUN', 'ERR_CHECK_KERNEL', `/dev/net/tun: ${err} (VM NICs need TAP devices)`),
    );
  } else out.push(skip('kernel: TUN', 'no VM has a NIC'));
  if (vms.some((v) => v.qemu.accel === 'kvm')) {
    const err = env.openDevice('/dev/kvm');
    out.push(
      err === null
        ? ok('kernel: KVM', '/dev/kvm opens')
        : fail('kernel: KVM', 'ERR_CHECK_KERNEL', `/dev/kvm: ${err} (a VM has qemu.accel kvm)`),
    );
  }
  const sd = env.softDirty();
  const required = vms.filter((v) => v.checkpoint.dirtyTracker === 'soft-dirty').map((v) => v.name);
  if (sd.supported) out.push(ok('kernel: soft-dirty', 'supported: the auto tracker uses it'));
  else if (required.length > 0)
    out.push(
      fail(
        'kernel: soft-dirty',
        'ERR_MEM_SOFTDIRTY_UNSUPPORTED',
        `${sd.why}; checkpoint.dirtyTracker soft-dirty in ${required.join(', ')}`,
      ),
    );
  else out.push(ok('kernel: soft-dirty', `not available (${sd.why}): the scan tracker runs instead`));
  return out;
}

function checkImage(vm: VmConfig, env: CheckEnv): CheckResult[] {
  const img = vm.disk!.image;
  const name = `vm ${vm.name}: disk image`;
  const info = env.stat(img);
  if (info === null) return [fail(name, 'ERR_CHECK_IMAGE', `${img} does not exist (or its shared storage is not mounted)`)];
  if (info.kind !== 'file' && info.kind !== 'block') return [fail(name, 'ERR_CHECK_IMAGE', `${img} is neither a file nor a block device`)];
  const err = env.access(img, 'rw');
  if (err !== null) return [fail(name, 'ERR_CHECK_IMAGE', `${img} is not readable and writable (${err})`)];
  if (info.kind === 'file' && info.size === 0) return [fail(name, 'ERR_CHECK_IMAGE', `${img} is empty: its length is the disk size`)];
  const out = [ok(name, `${img}${info.kind === 'file' ? `, ${mib(info.size)} MiB` : ', block device'}`)];
  const lock = env.lockProbe(img);
  const lname = `vm ${vm.name}: disk image locks`;
  if (lock === null || lock === 'EAGAIN' || lock === 'EACCES') out.push(ok(lname, `${img}: the file system supports locks`));
  else out.push(fail(lname, 'ERR_CHECK_LOCK', `${img}: a lock probe failed with ${lock} (shared storage without a lock manager?)`));
  // QEMU opens the image with cache.direct=on (docs/disk.md): a file system without O_DIRECT
  // (tmpfs) would make every QEMU of the VM fail to start.
  const direct = env.directProbe(img);
  const dname = `vm ${vm.name}: disk image O_DIRECT`;
  if (direct === null) out.push(ok(dname, `${img}: opens with O_DIRECT (QEMU's cache.direct=on)`));
  else out.push(fail(dname, 'ERR_CHECK_IMAGE', `${img}: open with O_DIRECT failed with ${direct}; QEMU opens it with cache.direct=on`));
  return out;
}

/** Where the daemon would start QEMU: its own systemd scope, or a session of its own under the sidecar. */
async function checkScope(host: HostConfig, env: CheckEnv): Promise<CheckResult> {
  const name = 'qemu scope';
  try {
    const r = await env.scope(host.systemd);
    return ok(name, r.slice !== null ? `each QEMU in a transient systemd scope in ${r.slice}` : `no systemd scope: ${r.why}`);
  } catch (e) {
    return fromError(name, e);
  }
}

async function checkPeer(host: HostConfig, peer: string, env: CheckEnv): Promise<CheckResult> {
  const name = `peer ${peer}`;
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:[\]]+)):(\d{1,5})$/.exec(peer);
  if (!m) return fail(name, 'ERR_USAGE', `--peer must be "host:port", got ${peer}`);
  if (!env.peerProbe) return skip(name, 'no peer probe in this environment');
  try {
    await env.peerProbe((m[1] ?? m[2])!, Number(m[3]), host.peer.key);
    return ok(name, 'reached, and the pre-shared key matches');
  } catch (e) {
    return fromError(name, e);
  }
}

/** One line per check: "ok    name: message" / "FAIL  name: CODE message" / "skip  name: message". */
export function formatResult(r: CheckResult): string {
  if (r.status === 'fail') return `FAIL  ${r.name}: ${r.code} ${r.message}`;
  return `${r.status.padEnd(4)}  ${r.name}: ${r.message}`;
}

export function allPassed(results: readonly CheckResult[]): boolean {
  return results.every((r) => r.status !== 'fail');
}
