/**
 * The real CheckEnv of `tether check`: what the checks ask of this host. Every probe only
 * looks (see check.ts): no file is created outside a private temporary directory, no lock
 * is kept, and the throwaway QEMU is killed before the check returns.
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { TetherError } from '../errors.ts';
import { loadNative, softDirtyProbe } from '../native.ts';
import { PeerChannel } from '../peer/channel.ts';
import { QmpClient } from '../qmp/client.ts';
import { migrateSetCapabilities, queryCommands, queryMigrateCapabilities } from '../qemu/commands.ts';
import { realScopeEnv, resolveScope } from '../qemu/scope.ts';
import { createLogger } from '../util/log.ts';
import type { CheckEnv, PathInfo, QemuProbe, QemuVersion } from './types.ts';

const run = promisify(execFile);

/**
 * A byte no one locks: QEMU's own image locking uses bytes 100..~300 (raw_apply_lock_bytes),
 * tether's NBD server takes none. A read lock there conflicts with nothing.
 */
export const LOCK_PROBE_OFFSET = 2 ** 52;

export function realCheckEnv(): CheckEnv {
  return {
    stat,
    access(p, mode) {
      try {
        fs.accessSync(p, mode === 'r' ? fs.constants.R_OK : fs.constants.R_OK | fs.constants.W_OK);
        return null;
      } catch (e) {
        return (e as NodeJS.ErrnoException).code ?? 'EACCES';
      }
    },
    statfs(p) {
      const s = fs.statfsSync(p);
      return { type: s.type, free: s.bavail * s.bsize };
    },
    linkKind,
    openDevice(p) {
      try {
        fs.closeSync(fs.openSync(p, fs.constants.O_RDWR | fs.constants.O_NONBLOCK));
        return null;
      } catch (e) {
        return (e as NodeJS.ErrnoException).code ?? 'EIO';
      }
    },
    lockProbe,
    directProbe(p) {
      try {
        fs.closeSync(fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_DIRECT | fs.constants.O_NONBLOCK));
        return null;
      } catch (e) {
        return (e as NodeJS.ErrnoException).code ?? 'EIO';
      }
    },
    qemuVersion,
    qemuQmp,
    softDirty() {
      try {
        const p = softDirtyProbe();
        if (p.supported) return { supported: true, why: '' };
        const why =
          p.clearRefsErrno !== 0
            ? `clear_refs rejected (errno ${p.clearRefsErrno})`
            : p.pagemapErrno !== 0
              ? `pagemap unreadable (errno ${p.pagemapErrno})`
              : 'the kernel never sets the soft-dirty bit (CONFIG_MEM_SOFT_DIRTY off)';
        return { supported: false, why };
      } catch (e) {
        return { supported: false, why: (e as Error).message };
      }
    },
    bindProbe,
    async peerProbe(host, port, key) {
      const ch = await PeerChannel.connect(host, port, { psk: key, connectTimeoutMs: 3000, handshakeTimeoutMs: 3000 });
      ch.close();
    },
    async scope(cfg) {
      let why = '';
      const capture = createLogger({}, 'debug', (line) => {
        why = (JSON.parse(line) as { msg: string }).msg;
      });
      const l = await resolveScope(cfg, realScopeEnv, capture);
      return { slice: l?.slice ?? null, why };
    },
    readSysctl(name) {
      try {
        return fs.readFileSync(path.join('/proc/sys', name), 'utf8').trim();
      } catch {
        return null;
      }
    },
    euid: process.geteuid?.() ?? -1,
  };
}

function stat(p: string): PathInfo | null {
  let s: fs.Stats;
  try {
    s = fs.statSync(p);
  } catch {
    return null;
  }
  const kind = s.isFile()
    ? 'file'
    : s.isDirectory()
      ? 'dir'
      : s.isBlockDevice()
        ? 'block'
        : s.isCharacterDevice()
          ? 'char'
          : s.isSocket()
            ? 'socket'
            : 'other';
  return { kind, mode: s.mode, uid: s.uid, size: s.size, allocated: s.blocks * 512 };
}

/** `ip -j -d link show dev <name>`: the link's kind in the current network namespace (netlink, not sysfs). */
async function linkKind(name: string): Promise<string | null> {
  let out: string;
  try {
    out = (await run('ip', ['-j', '-d', 'link', 'show', 'dev', name], { timeout: 10_000 })).stdout;
  } catch (e) {
    const err = e as { stderr?: string; code?: unknown };
    if (typeof err.stderr === 'string' && /does not exist/i.test(err.stderr)) return null;
    throw e;
  }
  const links = JSON.parse(out) as { linkinfo?: { info_kind?: string } }[];
  if (links.length === 0) return null;
  return links[0]!.linkinfo?.info_kind ?? '';
}

function lockProbe(p: string): string | null {
  const probe = (loadNative() as unknown as { ofdLockProbe?: (fd: number, offset: number) => number }).ofdLockProbe;
  if (typeof probe !== 'function') throw new TetherError('ERR_MEM_NATIVE_MISSING', 'the native addon has no ofdLockProbe: rebuild it');
  // Read-only: opening for reading disturbs no one and is all a read lock needs.
  const fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  try {
    const errno = probe(fd, LOCK_PROBE_OFFSET);
    return errno === 0 ? null : errnoName(errno);
  } finally {
    fs.closeSync(fd);
  }
}

function errnoName(n: number): string {
  for (const [k, v] of Object.entries(os.constants.errno)) if (v === n) return k;
  return `errno ${n}`;
}

async function qemuVersion(binary: string): Promise<QemuVersion> {
  const { stdout } = await run(binary, ['--version'], { timeout: 15_000 });
  const m = /QEMU emulator version (\d+)\.(\d+)\.(\d+)(?:\s*\(([^)]*)\))?/.exec(stdout);
  if (!m) throw new TetherError('ERR_CHECK_QEMU', `unrecognised --version output: ${JSON.stringify(stdout.slice(0, 120))}`, { binary });
  return { major: Number(m[1]), minor: Number(m[2]), micro: Number(m[3]), package: m[4] ?? '' };
}

/**
 * A throwaway QEMU with no machine (no guest, no RAM) waiting as a migration destination,
 * asked over QMP what it supports. Turning postcopy-ram on in that state makes QEMU run
 * its own host check (postcopy_ram_supported_by_host: userfaultfd and its API), the exact
 * one a real destination runs.
 */
async function qemuQmp(binary: string): Promise<QemuProbe> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-check-'));
  const sock = path.join(dir, 'qmp.sock');
  let stderr = '';
  const child = spawn(
    binary,
    ['-machine', 'none', '-nodefaults', '-display', 'none', '-incoming', 'defer', '-qmp', `unix:${sock},server=on,wait=off`],
    {
      stdio: ['ignore', 'ignore', 'pipe'],
      detached: true,
    },
  );
  child.stderr!.on('data', (b: Buffer) => (stderr = (stderr + b.toString()).slice(-2000)));
  const ac = new AbortController();
  child.on('error', () => ac.abort());
  child.once('exit', () => ac.abort());
  let qmp: QmpClient | undefined;
  try {
    qmp = await QmpClient.connect(sock, { retryUntilMs: 15_000, timeoutMs: 15_000, signal: ac.signal });
    const commands = (await queryCommands(qmp)).map((c) => c.name);
    const migrationCapabilities = (await queryMigrateCapabilities(qmp)).map((c) => c.capability);
    let postcopyError: string | null = null;
    try {
      await migrateSetCapabilities(qmp, [{ capability: 'postcopy-ram', state: true }]);
    } catch (e) {
      postcopyError = (e as Error).message;
    }
    return { commands, migrationCapabilities, postcopyError };
  } catch (e) {
    throw new TetherError('ERR_CHECK_QMP', `${(e as Error).message}${stderr.trim() ? `: ${stderr.trim()}` : ''}`, {
      binary,
      ...(e instanceof TetherError ? { cause: e.code } : {}),
    });
  } finally {
    await qmp?.close(); // never rejects
    if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
      const gone = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await gone;
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Binds host:0 (any free port: no conflict with a running daemon's listeners) and closes again. */
function bindProbe(host: string): Promise<string | null> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'EINVAL'));
    srv.listen({ host, port: 0, exclusive: true }, () => srv.close(() => resolve(null)));
  });
}
