/**
 * The sidecar for one host: supervises this host's VMs, serves the CLI on a unix socket and
 * accepts incoming migrations from peers. A composition of its parts, which share one
 * DaemonContext (context.ts):
 *  - control-rpc.ts  the control socket's methods (vm.start/stop, status, migrate, abort),
 *                    operator.ts its vm.adopt/vm.forget;
 *  - peer-admission.ts  the peer port: handshake, `prepare` (incoming migration), `resolve`;
 *  - nics.ts         the guests' NIC ports;
 *  - metrics-http.ts `GET /metrics`;
 *  - recovery.ts     after a restart, every VM found again (recovery-source.ts,
 *                    recovery-destination.ts, adopted.ts, qemu-records.ts).
 */
import fs from 'node:fs/promises';
import type http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import type { HostConfig } from '../config/types.ts';
import type { DestinationMigration } from '../migrate/destination.ts';
import { parseFaults } from '../migrate/faults.ts';
import type { Faults } from '../migrate/faults.ts';
import type { SourceMigration } from '../migrate/source.ts';
import { TetherMetrics } from '../metrics/registry.ts';
import { ignored } from '../util/log.ts';
import type { Logger } from '../util/log.ts';
import type { VmInstance } from '../vm/instance.ts';
import type { AwaitingAnswer, DaemonContext } from './context.ts';
import { serveControl } from './control-rpc.ts';
import { closeMetrics, serveMetrics } from './metrics-http.ts';
import { Nics } from './nics.ts';
import { PeerAdmission } from './peer-admission.ts';
import { readRecords, recoverOne } from './recovery.ts';
import { listen, listenPrivate } from './sockets.ts';

export { parseHostPort } from './sockets.ts';

export class Daemon {
  readonly host: HostConfig;
  readonly log: Logger;
  readonly vms = new Map<string, VmInstance>();
  /** Resolves once every VM found at start has been recovered (or left unrecovered). */
  recovered: Promise<void> = Promise.resolve();
  readonly metrics = new TetherMetrics((set) => {
    const counts = new Map<string, number>();
    for (const vm of this.vms.values()) counts.set(vm.place, (counts.get(vm.place) ?? 0) + 1);
    for (const [state, n] of counts) set({ state }, n);
  });
  readonly #faults: Faults;
  readonly #outgoing = new Map<string, SourceMigration>();
  readonly #incoming = new Map<string, DestinationMigration>();
  readonly #ctx: DaemonContext;
  #control: net.Server | undefined;
  #peer: net.Server | undefined;
  #http: http.Server | undefined;
  /** Open CLI connections: told at shutdown. */
  readonly #clients = new Set<net.Socket>();

  constructor(host: HostConfig, log: Logger, faults: Faults = parseFaults(process.env.TETHER_FAULTS)) {
    this.host = host;
    this.log = log;
    this.#faults = faults;
    this.#ctx = {
      host,
      log,
      faults,
      metrics: this.metrics,
      vms: this.vms,
      outgoing: this.#outgoing,
      incoming: this.#incoming,
      awaitingAnswer: new Map<string, AwaitingAnswer>(),
      damaged: new Set<string>(),
      nics: new Nics(faults, this.metrics, log),
    };
  }

  async start(): Promise<void> {
    const ctx = this.#ctx;
    await fs.mkdir(this.host.stateDir, { recursive: true, mode: 0o700 });
    await fs.mkdir(this.host.ramDir, { recursive: true, mode: 0o700 });
    // The control socket is born with its final mode (listenPrivate), in a directory only
    // this user enters when tether creates it: never a moment when another user can connect.
    await fs.mkdir(path.dirname(this.host.controlSocket), { recursive: true, mode: 0o700 });
    await fs.rm(this.host.controlSocket, { force: true });
    const pending = await readRecords(ctx);
    this.#control = net.createServer((s) => {
      this.#clients.add(s);
      s.on('close', () => this.#clients.delete(s));
      serveControl(ctx, s);
    });
    await listenPrivate(this.#control, this.host.controlSocket);
    const admission = new PeerAdmission(ctx);
    this.#peer = net.createServer((s) => void admission.serve(s));
    await listen(this.#peer, { host: this.host.peer.listen.host, port: this.host.peer.listen.port });
    if (this.host.metrics) this.#http = await serveMetrics(this.metrics, this.host.metrics);
    // Every VM at once, the sockets already open: one stuck VM does not hold the others
    // (their QEMUs give up on the NBD and NIC reconnects after ~15 s).
    this.recovered = Promise.all(pending.map((p) => recoverOne(ctx, p))).then(() => {});
    this.log.info('daemon ready', {
      control: this.host.controlSocket,
      peer: `${this.host.peer.listen.host}:${this.host.peer.listen.port}`,
      faults: Object.keys(this.#faults).length ? this.#faults : undefined,
    });
  }

  /**
   * Stop serving and let go of every guest WITHOUT stopping it: a sidecar restart
   * (SIGTERM, SIGINT or SIGKILL alike) never takes a VM down; the next start adopts
   * each running QEMU. Stopping guests is an explicit command (`tether vm stop`).
   * An outgoing migration is left exactly as a dying sidecar leaves it (no rollback
   * now; recovery resolves it at the next start). An incoming one is fenced: its
   * guest is the copy the source rolls back from, never the only one.
   */
  async shutdown(): Promise<void> {
    this.#control?.close();
    this.#peer?.close();
    closeMetrics(this.#http);
    const log = this.log;
    for (const m of this.#outgoing.values()) await m.detach().catch(ignored(log, 'shutdown: a migration may end meanwhile'));
    for (const d of this.#incoming.values()) await d.fence('daemon-shutdown').catch(ignored(log, 'shutdown: the fence is best effort'));
    // QEMU's tap backends keep the guests' NICs; the TAPs stay in their bridges.
    for (const vm of this.vms.values()) {
      await vm.detachQemu().catch(ignored(vm.log, 'shutdown: a QMP connection may be gone already'));
      await this.#ctx.nics.close(vm.name, false);
      await vm.stopDisk().catch(ignored(vm.log, 'shutdown: the disk export may never have started'));
    }
    // Requests still open (a `tether migrate` waiting) get their error line, then EOF.
    for (const s of this.#clients) s.end();
    await fs.rm(this.host.controlSocket, { force: true });
  }
}
