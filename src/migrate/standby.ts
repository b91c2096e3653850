/**
 * Hot-standby restore on the source.
 *
 * While a migration runs, the source keeps a second QEMU ready for a rollback: the same
 * command line over the same RAM file, but `-incoming defer` and its own QMP socket and
 * QEMU log. A deferred QEMU maps the RAM file, builds its devices and waits in state
 * `inmigrate`; its vCPUs never run and it does not write guest RAM (netns-tests/standby.test.ts
 * hashes the file around a standby's start). A rollback then costs a kill, a
 * `migrate-incoming exec:cat <devstate>` (device state only: the stream has no RAM
 * section, so QEMU keeps the RAM file as it is) and the switch to running — instead of a
 * whole QEMU start. Measured on QEMU 7.2 TCG, 512 MiB: migrate-incoming → running ≈ 17 ms
 * against ≈ 180 ms for a fresh QEMU.
 *
 * Facts this relies on (QEMU 7.2):
 *  - `migrate-incoming` on a `-incoming defer` QEMU loads a device-state file written by
 *    `xen-save-devices-state` (the "Expected vmdescription section" warning is harmless),
 *    given `-global migration.send-configuration=off`. (`xen-load-devices-state` on a
 *    deferred QEMU aborts on a yank assertion instead: not used.)
 *  - A unix socket keeps working when its file is renamed (connect resolves the path to
 *    the bound inode), so the promoted standby's QMP socket is renamed to the VM's.
 *
 * Guarantees:
 *  - the standby is never handed device state before the rollback is decided, and never
 *    `cont`ed before the wedged QEMU is dead, so the guest never runs twice. It starts with
 *    `-S`: {@link HotStandby.load} hands it the state while the wedged QEMU still serves
 *    post-copy and the destination may still run (the rollback proves it can restore before
 *    it fences the destination, docs/design.md "Restore before fence"); loaded, it waits
 *    `paused`;
 *  - the standby's pid + start time are recorded in standby.json the moment it is spawned
 *    (it is never found by its command line), and in vm.json only when it takes over
 *    ({@link HotStandby.takeOver}, after the wedged QEMU is dead) and BEFORE it runs, so a
 *    sidecar restart adopts a standby that may run the VM and kills one that never took
 *    over, loaded or not ({@link settleStandbys});
 *  - no standby (disabled, failed to start, died) means the cold path: a fresh QEMU.
 *
 * The QMP socket QEMU listens on has a standby path of its own here and is renamed on
 * promotion: QEMU unlinks a listening socket's path before binding it, so a standby sharing
 * a path would steal it from the running QEMU. The disk's NBD socket is the sidecar's (QEMU
 * connects), so the standby shares it. Each NIC's TAP is single-queue and held by the
 * running QEMU: the standby opens the NIC's other TAP in the same bridge (src/net/tap.ts
 * claimTap), and the promoted guest's announcement moves its MAC there.
 */
import fs from 'node:fs';
import path from 'node:path';
import { QmpClient } from '../qmp/client.ts';
import { identityAlive, killIdentity, QemuProcess } from '../qemu/process.ts';
import type { QemuIdentity } from '../qemu/process.ts';
import { shellQuote } from '../qemu/cmdline.ts';
import type { Logger } from '../util/log.ts';
import { errorFields, ignored } from '../util/log.ts';
import { cont, migrateIncoming, queryMigrate, queryStatus } from '../qemu/commands.ts';
import { nowMs } from '../util/time.ts';
import { TetherError } from '../errors.ts';
import { VmInstance } from '../vm/instance.ts';
import { claimNicTaps } from '../net/tap.ts';

/** File names in the VM's state dir (short: unix socket paths must stay < 108 bytes). */
export const STANDBY_QMP = 'standby.sock';
export const STANDBY_LOG = 'qemu-standby.log';
/** How long load() waits for the standby to have loaded the device state. */
const LOAD_TIMEOUT_MS = 15_000;

export function standbySocket(vm: VmInstance): string {
  return path.join(vm.dir, STANDBY_QMP);
}

export class HotStandby {
  readonly #vm: VmInstance;
  readonly #log: Logger;
  readonly #ready: Promise<QemuProcess | null>;
  #state: 'starting' | 'ready' | 'loaded' | 'promoted' | 'discarded' = 'starting';
  /** Spawn → QMP up, ms (null until ready or when the start failed). */
  startMs: number | null = null;
  /** A VM with NICs: the promoted standby stays paused until the caller connects them and says `cont`. */
  readonly hasNics: boolean;
  /** The process, once up (tests and load/takeOver). */
  #q: QemuProcess | null = null;

  /** Starts the standby in the background. Never rejects: a failed start means no standby. */
  static start(vm: VmInstance): HotStandby {
    return new HotStandby(vm);
  }

  private constructor(vm: VmInstance) {
    this.#vm = vm;
    this.#log = vm.log.child({ standby: true });
    this.hasNics = (vm.config.nics ?? []).length > 0;
    const t0 = nowMs();
    const cfg = vm.config;
    // The device-state file carries no configuration section (see cmdline.ts exec-file).
    // -S: the loaded VM stays paused until the wedged QEMU is dead (it is loaded before the
    // destination is fenced) and the sidecar says `cont`.
    const extra = ['-global', 'migration.send-configuration=off', '-S'];
    // Its own TAPs: the running QEMU holds the VM's single-queue ones (docs/network.md "Hot standby").
    this.#ready = claimNicTaps(cfg)
      .then((nicTaps) =>
        QemuProcess.start({
          vm: { ...cfg, qemu: { ...cfg.qemu, extraArgs: [...cfg.qemu.extraArgs, ...extra] } },
          ramFile: vm.ramFile,
          qmpSocket: standbySocket(vm),
          // The serial chardev opens the log for appending; a standby writes nothing to it
          // until it runs, and from then on it is the VM's console.
          serialLog: vm.serialLog,
          logFile: path.join(vm.dir, STANDBY_LOG),
          // TAPs of its own. The disk is QEMU's own file node, as in steady state: an incoming
          // QEMU opens its image inactive (no lock, no I/O) until it runs, and by then the QEMU
          // it replaces is dead (docs/disk.md, lock order).
          nicTaps,
          incoming: { kind: 'defer' },
          // its identity on disk the moment it exists: a restarted sidecar finds it by that alone
          onSpawned: (id) => vm.recordStandby(id),
        }),
      )
      .then(
        (q) => {
          this.startMs = Math.round((nowMs() - t0) * 100) / 100;
          if (this.#state === 'discarded') {
            void q.kill();
            return null;
          }
          this.#state = 'ready';
          this.#q = q;
          this.#log.info('hot standby ready', { pid: q.pid, startMs: this.startMs });
          return q;
        },
        (e: unknown) => {
          this.#log.warn('hot standby failed to start: a rollback will start a fresh QEMU', { error: errorFields(e) });
          return null;
        },
      );
  }

  /** Whether load() handed it the device state (it waits paused for takeOver). */
  get loaded(): boolean {
    return this.#state === 'loaded';
  }

  /** The standby's pid once it is up (null while starting, or when there is none). */
  async pid(): Promise<number | null> {
    const q = await this.#ready;
    return q && !q.hasExited ? q.pid : null;
  }

  /** The standby's run state as QEMU reports it ('inmigrate' while it waits), null when there is none. */
  async status(): Promise<string | null> {
    const q = await this.#ready;
    if (!q || q.hasExited || this.#state === 'discarded') return null;
    return (await queryStatus(q.qmp)).status;
  }

  /**
   * Hand the standby the device state of `devstatePath` while the VM's wedged QEMU may still
   * run: it loads it and waits `paused` (-S), never running the guest. This is the rollback's
   * proof that it can restore, taken before the destination is fenced. Throws (and kills the
   * standby) when there is no live standby or the load fails.
   */
  async load(devstatePath: string): Promise<void> {
    const q = await this.#ready;
    if (this.#state !== 'ready' || !q || q.hasExited) {
      throw new TetherError('ERR_RESTORE_UNAVAILABLE', `no live hot standby to load the device state (${this.#state})`);
    }
    const t0 = nowMs();
    try {
      // Never handed anything yet: it must still wait in 'inmigrate' with no incoming migration.
      const st = await queryStatus(q.qmp, { timeoutMs: 1000 });
      if (st.status !== 'inmigrate') throw new TetherError('ERR_RESTORE_UNAVAILABLE', `standby is ${st.status}, not inmigrate`);
      await migrateIncoming(q.qmp, `exec:cat ${shellQuote(devstatePath)}`);
      // ~20-35 ms normally; a bad file makes QEMU exit at once, but a stream that never
      // starts (QEMU 7.2 waits for its exec channel to become readable) would wait forever
      await q.waitForStatus('paused', LOAD_TIMEOUT_MS, 2);
      this.#state = 'loaded';
      this.#log.info('hot standby loaded the device state', { pid: q.pid, loadMs: Math.round((nowMs() - t0) * 100) / 100 });
    } catch (e) {
      this.#state = 'discarded';
      await q.kill();
      throw new TetherError('ERR_RESTORE_UNAVAILABLE', `the hot standby could not load ${devstatePath}: ${(e as Error).message}`, {
        cause: errorFields(e),
      });
    }
  }

  /**
   * The loaded standby becomes the VM's QEMU: its QMP socket takes the VM's path and
   * vm.json names it. It stays paused: the caller connects the NICs and says `cont`. The caller
   * has killed the VM's previous QEMU (its threads can no longer run) and suspended its ports.
   */
  async takeOver(): Promise<void> {
    const q = this.#q;
    if (this.#state !== 'loaded' || !q || q.hasExited) {
      throw new TetherError('ERR_RESTORE_FAILED', `the hot standby cannot take over (${this.#state})`);
    }
    q.renameSocket(this.#vm.qmpSocket);
    // The dead QEMU's NIC socket files are replaced: the ports reconnect to the standby.
    this.#state = 'promoted';
    await this.#vm.adoptStandby(q); // vm.json names it before it runs
    this.#log.info('hot standby took over', { pid: q.pid });
  }

  /**
   * load + takeOver, and `cont` for a VM without NICs (with NICs it waits paused: see
   * `hasNics`). The caller has killed the VM's previous QEMU and suspended its NIC ports.
   * Returns false when there is no usable standby (nothing the cold path needs was changed).
   */
  async promote(devstatePath: string): Promise<boolean> {
    if (this.#state !== 'ready' && this.#state !== 'starting') return false;
    try {
      await this.load(devstatePath);
    } catch (e) {
      this.#log.warn('hot standby promotion failed: starting a fresh QEMU', { error: errorFields(e) });
      return false;
    }
    await this.takeOver();
    if (!this.hasNics) {
      await cont(this.#q!.qmp);
      await this.#q!.waitForStatus('running', 60_000, 2);
    }
    return true;
  }

  /** Kill the standby unless it was promoted. Idempotent. */
  async discard(): Promise<void> {
    if (this.#state === 'promoted') return;
    if (this.#state === 'discarded') {
      await this.#q?.kill();
      return;
    }
    this.#state = 'discarded';
    const q = await this.#ready;
    if (q) {
      await q.kill();
      this.#log.info('hot standby discarded', { pid: q.pid });
    }
  }
}

/**
 * Resolves once no thread of the SIGKILLed QEMU `q` can run user code again: every thread
 * in /proc/<pid>/task has PF_EXITING (0x4) in its stat flags, or is gone. That is a few ms
 * after the signal; the full exit (the last thread tearing down the address space, then
 * the reaping) takes ~15-20 ms more and may overlap the standby's load. The pid cannot be
 * reused meanwhile: it stays a zombie until `exited` (our child, our reaping) resolves.
 */
export async function untilCannotRun(q: QemuProcess | undefined, exited: Promise<unknown>): Promise<void> {
  if (!q || q.hasExited) return exited.then(() => {});
  let done = false;
  void exited.then(() => (done = true));
  const deadline = nowMs() + 2000;
  while (!done && nowMs() < deadline) {
    if (allExiting(q.pid)) return;
    await new Promise((r) => setTimeout(r, 0.5));
  }
  await exited;
}

const PF_EXITING = 0x4;

function allExiting(pid: number): boolean {
  let tids: string[];
  try {
    tids = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return true; // gone
  }
  for (const tid of tids) {
    let stat: string;
    try {
      stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'latin1');
    } catch {
      continue; // this thread is gone
    }
    // "tid (comm) state ppid pgrp session tty_nr tpgid flags ...": comm may hold spaces
    const f = stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
    if ((Number(f[6]) & PF_EXITING) === 0) return false;
  }
  return true;
}

/**
 * Sidecar restart: kill the hot standby the previous sidecar recorded (standby.json, by pid +
 * start time) unless it was being promoted and got its device state, and return the QEMU to
 * recover (`recorded`, the one vm.json names, or null). A standby that vm.json names was being
 * promoted: kept if it got its device state (it may already run the VM: restoring over it
 * would run the guest twice), killed if it still waits with no incoming migration (the restart
 * then restores as without it). Nothing is found by its command line.
 */
export async function settleStandbys(vm: VmInstance, recorded: QemuIdentity | null, log: Logger): Promise<QemuIdentity | null> {
  const sb = await VmInstance.readStandby(vm.dir);
  if (!sb || !identityAlive(sb)) return recorded;
  const isRecorded = recorded !== null && recorded.pid === sb.pid && recorded.startTime === sb.startTime;
  if (isRecorded && (await gotDeviceState(vm.qmpSocket, log))) return recorded;
  log.warn('killing a hot standby left by the previous sidecar', { pid: sb.pid });
  await killIdentity(sb);
  return isRecorded ? null : recorded;
}

/**
 * Whether the QEMU on `qmpSocket` was handed its incoming migration. A command the dead
 * sidecar wrote before dying is read and run by QEMU before it accepts our connection
 * (one monitor client at a time), so the answer cannot be stale.
 */
async function gotDeviceState(qmpSocket: string, log: Logger): Promise<boolean> {
  let c: QmpClient | undefined;
  try {
    c = await QmpClient.connect(qmpSocket, { timeoutMs: 5000 });
    if ((await queryStatus(c)).status !== 'inmigrate') return true;
    return (await queryMigrate(c)).status !== undefined;
  } catch {
    return false; // no monitor: nothing to adopt either
  } finally {
    await c?.close().catch(ignored(log, 'a monitor connection to a QEMU about to be killed'));
  }
}
