/**
 * The peer port: who may connect, and what the first message after the handshake may start.
 *
 * HELLO/AUTH (src/peer/channel.ts) under a cap on unauthenticated connections; then either
 * `prepare` (an incoming migration: checked against this host's own config of the VM, then
 * handed to a DestinationMigration with its NIC gates already closed) or `resolve` (the
 * source's answer to a completion request, on a channel of its own).
 */
import path from 'node:path';
import type net from 'node:net';
import { loadVmConfig, PEER_DEFAULTS } from '../config/load.ts';
import type { VmConfig } from '../config/types.ts';
import { composeOutputs } from '../epoch/outputs.ts';
import { isTetherError, TetherError } from '../errors.ts';
import { resolvedMessage } from '../migrate/completion/protocol.ts';
import { DestinationMigration } from '../migrate/destination.ts';
import { PeerChannel } from '../peer/channel.ts';
import { asPeerControl } from '../peer/control.ts';
import type { PeerControl } from '../peer/control.ts';
import { errorFields, ignored } from '../util/log.ts';
import { deviceModelDigest, deviceModelText } from '../vm/device-model.ts';
import { VmInstance } from '../vm/instance.ts';
import type { DaemonContext } from './context.ts';
import { settled } from './context.ts';
import { answerRecovered } from './recovery-destination.ts';

type Prepare = Extract<PeerControl, { kind: 'prepare' }>;
type Resolve = Extract<PeerControl, { kind: 'resolve' }>;

/** Counts the connections to the peer port still in their handshake (shared by every accept). */
export class PeerAdmission {
  #unauthenticated = 0;
  readonly #ctx: DaemonContext;

  constructor(ctx: DaemonContext) {
    this.#ctx = ctx;
  }

  async serve(sock: net.Socket): Promise<void> {
    const ch = await this.#handshake(sock);
    if (!ch) return;
    let dest: DestinationMigration | undefined;
    let answered = false;
    ch.on('close', (err) => dest?.onChannelClosed(err));
    ch.on('message', (m) => {
      if (dest) {
        dest.onMessage(m);
        return;
      }
      if (answered) return;
      try {
        if (m.type !== 'control') throw new TetherError('ERR_PEER_PROTOCOL', `expected prepare, got ${m.type}`);
        const c = asPeerControl(m.body);
        if (c.kind === 'resolve') {
          answered = true;
          this.#answer(ch, c);
          return;
        }
        if (c.kind !== 'prepare') throw new TetherError('ERR_PEER_PROTOCOL', `expected prepare, got ${c.kind}`);
        dest = this.#admit(ch, c);
      } catch (e) {
        this.#ctx.log.warn('incoming migration refused', { error: errorFields(e) });
        const err = e as TetherError;
        ch.send({ type: 'abort', code: err.code ?? 'ERR_PEER_PROTOCOL', reason: err.message })
          .catch(ignored(this.#ctx.log, 'the refused peer may have closed already'))
          .finally(() => ch.close());
      }
    });
    ch.start();
  }

  /**
   * Nobody unauthenticated makes this daemon allocate or act: at most maxUnauthenticated
   * connections handshake at once (more are closed at accept), each for at most
   * handshakeTimeoutMs, and before AUTH no frame may exceed the handshake's own size
   * (channel.ts, codec.ts HANDSHAKE_MAX_FRAME). Every refusal is counted.
   */
  async #handshake(sock: net.Socket): Promise<PeerChannel | null> {
    const { host, metrics, log } = this.#ctx;
    sock.on('error', ignored(log, 'a peer connection reset: its close follows'));
    const cap = host.peer.maxUnauthenticated ?? PEER_DEFAULTS.maxUnauthenticated;
    if (this.#unauthenticated >= cap) {
      metrics.peerRefused.inc({ reason: 'unauthenticated_cap' });
      log.warn('peer connection refused: too many unauthenticated connections', { remote: sock.remoteAddress, cap });
      sock.destroy();
      return null;
    }
    this.#unauthenticated++;
    try {
      return await PeerChannel.accept(sock, {
        psk: host.peer.key,
        handshakeTimeoutMs: host.peer.handshakeTimeoutMs ?? PEER_DEFAULTS.handshakeTimeoutMs,
      });
    } catch (e) {
      metrics.peerRefused.inc({ reason: refusalReason(e) });
      log.warn('peer rejected', { remote: sock.remoteAddress, error: errorFields(e) });
      return null;
    } finally {
      this.#unauthenticated--;
    }
  }

  /**
   * The source's answer to a completion request, on a channel of its own (the migration
   * channel was lost): hand it to that incoming migration, confirm, and let the source close.
   */
  #answer(ch: PeerChannel, c: Resolve): void {
    const inc = this.#ctx.incoming.get(c.vm);
    // Either checks the migration id first: a stale answer (to an earlier migration of
    // the VM) is refused with ERR_MIGRATION_ID_MISMATCH and changes nothing.
    const a = inc ? inc.resolve(c) : answerRecovered(this.#ctx, c);
    this.#ctx.log.info('completion answer from the source', {
      vm: c.vm,
      migrationId: c.migrationId,
      outcome: c.outcome,
      epoch: c.epoch,
      known: a.known,
      ...(a.known ? {} : { code: a.code, why: a.message }),
    });
    ch.send(resolvedMessage(c.migrationId, a)).catch(ignored(this.#ctx.log, 'the source may close once it has its answer'));
    setTimeout(() => ch.close(), 5000).unref();
  }

  /** Admit an incoming migration: checked and registered in one synchronous step, then run. */
  #admit(ch: PeerChannel, c: Prepare): DestinationMigration {
    const ctx = this.#ctx;
    const cfg = incomingConfig(ctx, c);
    refuseBusy(ctx, cfg.name);
    // The gates exist, gated, before the incoming QEMU is even started: the guest
    // can run here only after 'ready', and every frame it sends is held from then on.
    const gateMode = ctx.faults.gateOpen ? 'pass' : 'gated';
    if (ctx.faults.gateOpen) ctx.log.warn('fault injection: destination gate forced open', { vm: cfg.name });
    const ports = ctx.nics.create(new VmInstance(ctx.host, cfg, ctx.log), gateMode, true);
    const dest = new DestinationMigration({
      host: ctx.host,
      channel: ch,
      migrationId: c.migrationId,
      vmConfig: cfg,
      sendConfiguration: c.sendConfiguration,
      ...(c.window !== undefined ? { sourceWindow: c.window } : {}),
      log: ctx.log,
      faults: ctx.faults,
      outputs: composeOutputs(ports.map((p) => p.gate)),
      onInstance: (vm) => ctx.vms.set(vm.name, vm),
      onStaleResolve: () => ctx.metrics.staleResolves.inc(),
      onQemuStarted: (vm) => ctx.nics.open(vm, ports),
      onCompleted: async (vm) => {
        const q = vm.qemu;
        if (!q) return;
        for (const p of ports) {
          const ms = await p.detach(q.qmp);
          ctx.metrics.relayDetachMs.set({ vm: vm.name, nic: p.name }, ms);
        }
      },
    });
    ctx.incoming.set(cfg.name, dest);
    ctx.log.info('incoming migration accepted', { vm: cfg.name, migrationId: c.migrationId, from: ch.remote });
    void dest.run();
    void dest.done.promise.then(async (phase) => {
      if (phase === 'fenced') await ctx.nics.close(cfg.name, true);
      ctx.incoming.delete(cfg.name);
      ctx.metrics.migrations.inc({ role: 'destination', outcome: phase });
      ctx.log.info('incoming migration ended', { vm: cfg.name, migrationId: dest.id, phase });
    });
    return dest;
  }
}

/**
 * A second prepare for the name (even one racing on another connection) finds the first in
 * `incoming`; a VM that is here and not stopped, gone or fenced is in the way too.
 */
function refuseBusy(ctx: DaemonContext, name: string): void {
  if (ctx.incoming.has(name)) throw new TetherError('ERR_PEER_VM_BUSY', `VM ${name} is already migrating in to ${ctx.host.name}`);
  const existing = ctx.vms.get(name);
  if (ctx.damaged.has(name)) throw new TetherError('ERR_STATE_FILE_CORRUPT', `VM ${name}'s record on ${ctx.host.name} is damaged`);
  if (existing) settled(existing);
  if (existing && !['stopped', 'gone', 'fenced'].includes(existing.place)) {
    throw new TetherError('ERR_PEER_VM_BUSY', `VM ${name} is already ${existing.place} on ${ctx.host.name}`);
  }
}

/**
 * The destination's own config of the VM a `prepare` names: what QEMU will run
 * here comes from this host's vmConfigDir only, never from the peer. The peer's
 * device-model digest must match it, and this host's fence timeout must be
 * below the source's failover timeout (D stops before S resumes).
 */
function incomingConfig(ctx: DaemonContext, c: Prepare): VmConfig {
  const host = ctx.host.name;
  const file = path.join(ctx.host.vmConfigDir, `${c.vm}.yaml`);
  let cfg: VmConfig;
  try {
    cfg = loadVmConfig(file);
  } catch (e) {
    if (isTetherError(e, 'ERR_CONFIG_READ') && e.details?.['errno'] === 'ENOENT') {
      throw new TetherError('ERR_PEER_UNKNOWN_VM', `host ${host} has no VM ${c.vm} (no ${file})`, { vm: c.vm });
    }
    const err = e as TetherError;
    throw new TetherError(err.code ?? 'ERR_PEER_UNKNOWN_VM', `host ${host}: config of VM ${c.vm}: ${err.message}`, { vm: c.vm });
  }
  if (cfg.name !== c.vm) {
    throw new TetherError('ERR_PEER_UNKNOWN_VM', `host ${host}: ${file} describes VM ${cfg.name}, not ${c.vm}`, { vm: c.vm });
  }
  if (deviceModelDigest(cfg) !== c.deviceModel) {
    throw new TetherError(
      'ERR_PEER_DEVICE_MODEL',
      `VM ${c.vm} has another device model on ${host} (${deviceModelText(cfg)}); both hosts' configs must agree`,
      { vm: c.vm, deviceModel: deviceModelText(cfg) },
    );
  }
  if (cfg.checkpoint.fenceTimeoutMs >= c.failoverTimeoutMs) {
    throw new TetherError(
      'ERR_PEER_TIMEOUTS',
      `VM ${c.vm}: fenceTimeoutMs ${cfg.checkpoint.fenceTimeoutMs} on ${host} is not below the source's ` +
        `failoverTimeoutMs ${c.failoverTimeoutMs}`,
      { vm: c.vm },
    );
  }
  return cfg;
}

/** The metric label of a peer connection that failed its handshake. */
function refusalReason(e: unknown): string {
  if (!(e instanceof TetherError)) return 'handshake_error';
  if (e.code === 'ERR_PROTO_FRAME_TOO_LARGE') return 'frame_too_large';
  if (e.code === 'ERR_PEER_AUTH' || e.code === 'ERR_PROTO_BAD_AUTH') return 'auth_failed';
  if (e.code === 'ERR_PEER_HANDSHAKE' && e.details?.timeout !== undefined) return 'handshake_timeout';
  if (e.code === 'ERR_PEER_HANDSHAKE' && e.details?.closed === true) return 'closed';
  return 'handshake_error';
}
