import fs from 'node:fs/promises';
import path from 'node:path';
import { CheckpointAssembler } from '../checkpoint/assembler.ts';
import type { Checkpoint } from '../checkpoint/assembler.ts';
import type { Message } from '../checkpoint/messages.ts';
import { PAGE_SIZE } from '../checkpoint/messages.ts';
import { CheckpointStore } from '../checkpoint/store.ts';
import type { HostConfig } from '../config/types.ts';
import { remoteError, TetherError } from '../errors.ts';
import { hashRamFile } from '../memory/ram.ts';
import type { TetherMetrics } from '../metrics/registry.ts';
import { PeerChannel } from '../peer/channel.ts';
import { errorFields } from '../util/log.ts';
import { StateMachine } from '../util/state.ts';
import { deferred, nowMs, sleep } from '../util/time.ts';
import type { VmInstance } from '../vm/instance.ts';
import { asPeerControl } from './control-messages.ts';
import type { PeerControl } from './control-messages.ts';
import { round, summarize } from './result.ts';
import { HotStandby, untilCannotRun } from './standby.ts';
import type { MigrationResult, RollbackFigures } from './result.ts';

export type SourcePhase = 'connecting' | 'precopy' | 'switchover' | 'postcopy' | 'completed' | 'rolling-back' | 'rolled-back' | 'failed';

const TRANSITIONS: Record<SourcePhase, readonly SourcePhase[]> = {
  connecting: ['precopy', 'rolling-back'],
  precopy: ['switchover', 'rolling-back'],
  switchover: ['postcopy', 'rolling-back'],
  postcopy: ['completed', 'rolling-back'],
  'rolling-back': ['rolled-back', 'failed'],
  completed: [],
  'rolled-back': [],
  failed: [],
};

/** Pages per HASHES message: 64 Ki pages = 512 KiB of hashes. */
const HASH_CHUNK_PAGES = 65536;
const HEARTBEAT_MS = 200;
const PROGRESS_MS = 500;

export interface SourceOptions {
  host: HostConfig;
  metrics?: TetherMetrics;
  vm: VmInstance;
  to: { host: string; port: number };
  onProgress?: (p: Record<string, unknown>) => void;
}

/**
 * The source side of one migration. Owns the decision to roll back: once
 * taken, no ACK is ever sent again, so the destination can never release an
 * output of an epoch after the checkpoint the VM resumes from.
 */
export class SourceMigration {
  readonly phase: StateMachine<SourcePhase>;
  readonly #opts: SourceOptions;
  readonly #vm: VmInstance;
  readonly #store: CheckpointStore;
  readonly #result = deferred<MigrationResult>();
  readonly #t0 = nowMs();
  #channel: PeerChannel | undefined;
  #assembler: CheckpointAssembler | undefined;
  #applyChain: Promise<void> = Promise.resolve();
  #lastHeard = nowMs();
  #decided = false;
  #timers: NodeJS.Timeout[] = [];
  #controlWaiters = new Map<string, (c: PeerControl) => void>();
  #switchoverAt: number | null = null;
  /** Set just before migrate-continue: from then on the source QEMU may have handed the VM over. */
  #continued = false;
  #appliedEpoch: number | null = null;
  #pauses: number[] = [];
  #ckptBytes: number[] = [];
  #tracker: string | null = null;
  #lastPauseMs: number | null = null;
  /** A QEMU waiting (-incoming defer) to take over on rollback; see standby.ts. */
  #standby: HotStandby | undefined;

  constructor(opts: SourceOptions) {
    this.#opts = opts;
    this.#vm = opts.vm;
    this.phase = new StateMachine<SourcePhase>('migration', 'connecting', TRANSITIONS, this.#vm.log);
    this.#store = new CheckpointStore({
      dir: this.#vm.checkpointDir,
      ramPath: this.#vm.ramFile,
      ramBytes: this.#vm.ramBytes,
    });
  }

  get appliedEpoch(): number | null {
    return this.#appliedEpoch;
  }

  /** Runs the migration to its outcome. Never rejects: failures become a rollback or a 'failed' result. */
  run(): Promise<MigrationResult> {
    this.#setup().catch((e) => this.rollback('setup-failed', e));
    return this.#result.promise;
  }

  /** Operator abort (or any caller-side reason): roll back now. */
  abort(reason = 'operator-abort'): void {
    void this.rollback(reason, undefined, 0);
  }

  async #setup(): Promise<void> {
    const vm = this.#vm;
    const qemu = vm.qemu;
    if (!qemu || qemu.hasExited) throw new TetherError('ERR_VM_NOT_RUNNING', `VM ${vm.name} has no running QEMU`);
    // Before switchover the VM dies with it; in post-copy the destination can no
    // longer fetch the pages it lacks. Either way: resume from the last checkpoint.
    qemu.exited.then(() => {
      if (!this.#decided && !this.phase.is('completed')) {
        void this.rollback('source-qemu-exited', new TetherError('ERR_SOURCE_QEMU_EXITED', 'source QEMU exited'));
      }
    });
    // Old checkpoints go before the marker appears: a sidecar restarted in between must
    // never find a marker next to a previous migration's applied record.
    await fs.rm(vm.checkpointDir, { recursive: true, force: true });
    await vm.setMigrationMarker({
      role: 'source',
      qemuPid: qemu.pid,
      peer: `${this.#opts.to.host}:${this.#opts.to.port}`,
      startedAt: new Date().toISOString(),
    });
    await fs.mkdir(vm.checkpointDir, { recursive: true, mode: 0o700 });

    const ch = await PeerChannel.connect(this.#opts.to.host, this.#opts.to.port, { psk: this.#opts.host.peer.key });
    this.#channel = ch;
    ch.on('message', (m) => this.#onMessage(m));
    ch.on('close', (err) => {
      if (!this.#decided && !this.phase.is('completed')) void this.rollback('peer-channel-closed', err);
    });
    ch.start();
    if (ch.closed) throw new TetherError('ERR_PEER_CLOSED', 'peer closed the channel right after the handshake');

    await ch.send({ type: 'control', body: { kind: 'prepare', vm: vm.config, sendConfiguration: vm.sendConfiguration } });
    const ready = await this.#waitControl('ready', 60_000);
    if (ready.kind !== 'ready') throw new Error('unreachable');
    vm.log.info('destination ready', { uri: ready.uri });
    this.#progress({ phase: 'precopy', destination: ready.uri });

    const qmp = qemu.qmp;
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'postcopy-ram', state: true },
        { capability: 'pause-before-switchover', state: true },
      ],
    });
    const bw = vm.config.migration.maxBandwidth;
    if (bw > 0) await qmp.execute('migrate-set-parameters', { 'max-bandwidth': bw, 'max-postcopy-bandwidth': bw });
    this.phase.to('precopy');
    await qmp.execute('migrate', { uri: ready.uri });
    // Started now so that it is up by switchover; it stays idle until a rollback.
    if (vm.config.migration.hotStandby && !this.#decided) this.#standby = HotStandby.start(vm);
    this.#every(PROGRESS_MS, () => void this.#reportProgress());

    await sleep(vm.config.migration.precopyMs);
    if (this.#decided) return;
    await qmp.execute('migrate-start-postcopy');

    await this.#waitMigrationStatus('pre-switchover');
    if (this.#decided) return;
    this.phase.to('switchover');
    // Checkpoint 0: the source's own state, saved while paused before switchover.
    const tmp = path.join(vm.dir, 'checkpoint0.devstate.tmp');
    await qmp.execute('xen-save-devices-state', { filename: tmp, live: false });
    const dev0 = await fs.readFile(tmp);
    await fs.rm(tmp, { force: true });
    await this.#store.init0(dev0);
    this.#appliedEpoch = 0;
    if (this.#decided) return;
    this.#continued = true;
    await qmp.execute('migrate-continue', { state: 'pre-switchover' });
    this.#switchoverAt = nowMs();
    this.#lastHeard = nowMs();
    this.phase.to('postcopy');
    this.#progress({ phase: 'postcopy', appliedEpoch: 0 });
    this.#every(100, () => this.#checkLease());
    this.#every(HEARTBEAT_MS, () => {
      if (!this.#decided && !ch.closed) ch.send({ type: 'heartbeat', epoch: this.#appliedEpoch ?? 0, sentAt: Date.now() }).catch(() => {});
    });

    // The destination's baseline: a hash per page of the RAM file as of checkpoint 0.
    // The RAM file is frozen now (QEMU is past switchover; only checkpoint pages change it).
    const pages = vm.ramBytes / PAGE_SIZE;
    const table = await hashRamFile(vm.ramFile, vm.ramBytes);
    for (let start = 0; start < pages; start += HASH_CHUNK_PAGES) {
      const n = Math.min(HASH_CHUNK_PAGES, pages - start);
      await ch.send({ type: 'hashes', startPfn: start, hashes: table.subarray(start * 8, (start + n) * 8) });
    }
    await ch.send({ type: 'control', body: { kind: 'hashes-done', pages } });
  }

  #onMessage(m: Message): void {
    this.#lastHeard = nowMs();
    switch (m.type) {
      case 'begin':
      case 'pages':
      case 'disk':
      case 'devstate':
      case 'commit':
        this.#onCheckpointMessage(m);
        return;
      case 'heartbeat':
        return;
      case 'control': {
        let c: PeerControl;
        try {
          c = asPeerControl(m.body);
        } catch (e) {
          void this.rollback('bad-control-message', e);
          return;
        }
        if (c.kind === 'epoch-stats') {
          this.#pauses.push(c.pauseMs);
          this.#opts.metrics?.pause.observe(c.pauseMs / 1000);
          this.#lastPauseMs = c.pauseMs;
          this.#tracker = c.tracker;
        } else if (c.kind === 'done') {
          void this.#complete(c.finalEpoch);
        }
        const w = this.#controlWaiters.get(c.kind);
        if (w) {
          this.#controlWaiters.delete(c.kind);
          w(c);
        }
        return;
      }
      case 'abort':
        void this.rollback('destination-abort', remoteError(m.code, m.reason), 0);
        return;
      default:
        this.#vm.log.warn('unexpected message from destination', { type: m.type });
    }
  }

  #onCheckpointMessage(m: Message): void {
    if (this.#decided) return;
    if (this.#appliedEpoch === null) {
      void this.rollback('protocol', new TetherError('ERR_CKPT_SEQUENCE', 'checkpoint before checkpoint 0 was recorded'));
      return;
    }
    this.#assembler ??= new CheckpointAssembler({
      ramPages: this.#vm.ramBytes / PAGE_SIZE,
      maxCheckpointBytes: this.#vm.ramBytes + 64 * 1024 * 1024,
      expectEpoch: 1,
    });
    let ckpt: Checkpoint | null;
    try {
      ckpt = this.#assembler.accept(m as never);
    } catch (e) {
      const err = e as TetherError;
      this.#channel
        ?.send({ type: 'nack', epoch: 'epoch' in m ? m.epoch : -1, code: err.code ?? 'ERR_CKPT', message: err.message })
        .catch(() => {});
      void this.rollback('bad-checkpoint', e);
      return;
    }
    if (!ckpt) return;
    const c = ckpt;
    this.#applyChain = this.#applyChain.then(() => this.#apply(c));
  }

  async #apply(ckpt: Checkpoint): Promise<void> {
    if (this.#decided) return;
    const t0 = nowMs();
    try {
      await this.#store.apply(ckpt);
      this.#vm.log.debug('checkpoint applied', { epoch: ckpt.epoch, pages: ckpt.pfns.length, applyMs: +(nowMs() - t0).toFixed(2) });
    } catch (e) {
      void this.rollback('apply-failed', e);
      return;
    }
    this.#appliedEpoch = ckpt.epoch;
    const bytes = ckpt.data.length + ckpt.devstate.length + ckpt.disk.reduce((s, d) => s + d.data.length, 0);
    this.#ckptBytes.push(bytes);
    this.#opts.metrics?.checkpointsApplied.inc();
    this.#opts.metrics?.checkpointBytes.inc({}, bytes);
    // Never ack once the rollback is decided: D must not release this epoch's outputs.
    if (this.#decided) return;
    await this.#channel?.send({ type: 'ack', epoch: ckpt.epoch }).catch(() => {});
  }

  #checkLease(): void {
    if (this.#decided) return;
    const silent = nowMs() - this.#lastHeard;
    if (silent > this.#vm.config.checkpoint.failoverTimeoutMs) {
      void this.rollback(
        'lease-expired',
        new TetherError('ERR_LEASE_EXPIRED', `nothing heard from the destination for ${Math.round(silent)} ms`),
      );
    }
  }

  async #complete(finalEpoch: number): Promise<void> {
    if (this.#decided) return;
    await this.#applyChain;
    if (this.#decided) return;
    this.#decided = true;
    this.#stopTimers();
    this.phase.to('completed', { finalEpoch });
    this.#channel?.close();
    await this.#standby?.discard();
    // The VM lives on the destination now; the source's copy is dropped.
    await this.#vm.stopQemu().catch(() => {});
    await this.#vm.removeRam().catch(() => {});
    await this.#vm.forget().catch(() => {});
    this.#vm.place = 'gone';
    this.#finish({ outcome: 'completed' });
  }

  /**
   * Resume the VM on the source from the last applied checkpoint. `detectMs`
   * is how long the failure took to notice (defaults to the silence since the
   * destination's last message).
   */
  async rollback(reason: string, err?: unknown, detectMs?: number): Promise<void> {
    if (this.#decided) return;
    this.#decided = true;
    const tDecide = nowMs();
    const detect = detectMs ?? tDecide - this.#lastHeard;
    this.#stopTimers();
    const vm = this.#vm;
    vm.log.warn('rolling back', { reason, ...(err ? { error: errorFields(err) } : {}) });
    this.phase.to('rolling-back', { reason });
    vm.place = 'rolling-back';
    this.#progress({ phase: 'rolling-back', reason });
    const ch = this.#channel;
    if (ch && !ch.closed) {
      await Promise.race([ch.send({ type: 'abort', code: 'ERR_ROLLBACK', reason }).catch(() => {}), sleep(200)]);
      ch.close();
    }
    for (const w of this.#controlWaiters.values()) w({ kind: 'hashes-done', pages: -1 });
    this.#controlWaiters.clear();

    const figures: RollbackFigures = { reason, epoch: null, detectMs: round(detect), restoreMs: 0, killMs: 0, startMs: 0, announceMs: 0 };
    let tRestored: number | null = null;
    try {
      if (!this.#continued) {
        // Before switchover the source QEMU still owns the VM: cancel and carry on.
        await this.#cancelPrecopy();
      } else {
        await this.#applyChain; // an apply under way completes (but is not acked)
        const last = this.#store.lastApplied();
        figures.epoch = last.epoch;
        const t1 = nowMs();
        const exited = vm.killQemu();
        // A standby may load while the old QEMU's teardown finishes, once that can no longer run.
        await (this.#standby ? untilCannotRun(vm.qemu, exited) : exited);
        const t2 = nowMs();
        figures.hot = (await this.#standby?.promote(last.devstatePath)) ?? false;
        if (!figures.hot) await exited.then(() => vm.restoreFrom(last.devstatePath));
        await waitRunning(vm);
        const t3 = nowMs();
        await vm.qemu!.qmp.execute('announce-self', { initial: 50, max: 550, rounds: 5, step: 100 });
        const t4 = nowMs();
        tRestored = t4;
        await exited; // the old QEMU's teardown may outlast the restore; not counted in it
        figures.killMs = round(t2 - t1);
        figures.startMs = round(t3 - t2);
        figures.announceMs = round(t4 - t3);
      }
      figures.restoreMs = round((tRestored ?? nowMs()) - tDecide);
      vm.place = 'running';
      this.phase.to('rolled-back', { epoch: figures.epoch, restoreMs: figures.restoreMs });
      this.#finish({ outcome: 'rolled-back', reason, err, rollback: figures });
    } catch (e) {
      vm.log.error('rollback failed: the VM is not running', { error: errorFields(e) });
      vm.place = 'stopped';
      this.phase.to('failed');
      this.#finish({ outcome: 'failed', reason, err: e, rollback: figures });
    }
  }

  async #cancelPrecopy(): Promise<void> {
    const q = this.#vm.qemu;
    if (!q || q.hasExited) throw new TetherError('ERR_SOURCE_QEMU_EXITED', 'source QEMU is gone before switchover');
    await q.qmp.execute('migrate_cancel').catch(() => {});
    for (let i = 0; i < 500; i++) {
      const st = (await q.qmp.execute('query-migrate')) as { status?: string };
      if (st.status !== 'active' && st.status !== 'cancelling' && st.status !== 'setup' && st.status !== 'pre-switchover') break;
      await sleep(20);
    }
    const s = (await q.qmp.execute('query-status')) as { status: string };
    if (s.status !== 'running') await q.qmp.execute('cont');
  }

  #finish(p: { outcome: MigrationResult['outcome']; reason?: string; err?: unknown; rollback?: RollbackFigures }): void {
    void this.#standby?.discard(); // a no-op once promoted
    void this.#vm.setMigrationMarker(null).catch(() => {});
    const m = this.#opts.metrics;
    m?.migrations.inc({ role: 'source', outcome: p.outcome });
    if (p.rollback) {
      m?.rollbacks.inc({ reason: p.reason ?? 'unknown' });
      if (p.outcome === 'rolled-back') m?.restore.observe(p.rollback.restoreMs / 1000);
    }
    const err = p.err as { code?: string; message?: string } | undefined;
    this.#result.resolve({
      vm: this.#vm.name,
      outcome: p.outcome,
      ...(p.reason ? { reason: p.reason } : {}),
      ...(err ? { error: { code: err.code ?? 'ERR_UNKNOWN', message: err.message ?? String(err) } } : {}),
      totalMs: round(nowMs() - this.#t0),
      switchoverMs: this.#switchoverAt === null ? null : round(this.#switchoverAt - this.#t0),
      checkpoints: this.#ckptBytes.length,
      appliedEpoch: this.#appliedEpoch,
      tracker: this.#tracker,
      pauseMs: summarize(this.#pauses),
      checkpointBytes:
        this.#ckptBytes.length === 0
          ? null
          : {
              avg: Math.round(this.#ckptBytes.reduce((a, b) => a + b, 0) / this.#ckptBytes.length),
              p50: summarize(this.#ckptBytes)!.p50,
              max: Math.max(...this.#ckptBytes),
              total: this.#ckptBytes.reduce((a, b) => a + b, 0),
            },
      ...(p.rollback ? { rollback: p.rollback } : {}),
    });
  }

  async #reportProgress(): Promise<void> {
    const q = this.#vm.qemu;
    if (this.#decided || !q || q.hasExited) return;
    try {
      const m = (await q.qmp.execute('query-migrate', undefined, { timeoutMs: 2000 })) as {
        status?: string;
        ram?: { transferred: number; remaining: number; total: number; 'postcopy-requests'?: number };
      };
      this.#progress({
        phase: this.phase.state,
        qemuStatus: m.status,
        ram: m.ram ? { transferred: m.ram.transferred, remaining: m.ram.remaining, total: m.ram.total } : undefined,
        appliedEpoch: this.#appliedEpoch,
        lastPauseMs: this.#lastPauseMs,
      });
    } catch {
      /* progress is best effort */
    }
  }

  #progress(p: Record<string, unknown>): void {
    this.#opts.onProgress?.({ t: round(nowMs() - this.#t0), ...p });
  }

  #waitControl(kind: PeerControl['kind'], timeoutMs: number): Promise<PeerControl> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#controlWaiters.delete(kind);
        reject(new TetherError('ERR_PEER_TIMEOUT', `destination did not answer '${kind}' within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#controlWaiters.set(kind, (c) => {
        clearTimeout(timer);
        if (this.#decided) reject(new TetherError('ERR_MIGRATION_ENDED', 'migration ended'));
        else resolve(c);
      });
    });
  }

  async #waitMigrationStatus(want: string): Promise<void> {
    const q = this.#vm.qemu!;
    for (;;) {
      if (this.#decided) return;
      const m = (await q.qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
      if (m.status === want) return;
      if (m.status === 'failed' || m.status === 'cancelled') {
        throw new TetherError('ERR_QEMU_MIGRATION_FAILED', `source QEMU migration ${m.status}: ${m['error-desc'] ?? ''}`);
      }
      await sleep(10);
    }
  }

  #every(ms: number, fn: () => void): void {
    this.#timers.push(setInterval(fn, ms));
  }

  #stopTimers(): void {
    for (const t of this.#timers) clearInterval(t);
    this.#timers = [];
  }
}

export async function waitRunning(vm: VmInstance, timeoutMs = 60_000): Promise<void> {
  const q = vm.qemu!;
  const deadline = nowMs() + timeoutMs;
  while (nowMs() < deadline) {
    if (q.hasExited) throw new TetherError('ERR_RESTORE_FAILED', `restored QEMU exited: ${q.stderrTail?.() ?? ''}`);
    const s = (await q.qmp.execute('query-status')) as { status: string };
    if (s.status === 'running') return;
    await sleep(10);
  }
  throw new TetherError('ERR_RESTORE_FAILED', `restored QEMU not running after ${timeoutMs} ms`);
}
