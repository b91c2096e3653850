/**
 * A small Prometheus registry (text exposition format 0.0.4): counters and
 * gauges with labels, and summaries over a sliding window of observations.
 * No I/O of its own (it samples the event loop delay): the daemon serves `render()` over HTTP.
 * Components report through counter callbacks they define (GateCounters, NicCounters);
 * nicCounters adapts them here, so components never import this folder.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { NIC_DROP_REASONS, type NicCounters } from '../net/nic.ts';
type Labels = Record<string, string>;

const key = (labels: Labels): string =>
  Object.keys(labels)
    .sort()
    .map((k) => `${k}="${escapeLabel(labels[k]!)}"`)
    .join(',');

const escapeLabel = (v: string): string => v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');

const fmt = (v: number): string => (Number.isFinite(v) ? String(v) : Number.isNaN(v) ? 'NaN' : v > 0 ? '+Inf' : '-Inf');

/** One sample line per label set: `name{labels} value`. */
const samples = (name: string, values: Map<string, number>): string[] =>
  [...values].map(([k, v]) => `${name}${k ? `{${k}}` : ''} ${fmt(v)}`);

interface Family {
  name: string;
  help: string;
  type: 'counter' | 'gauge' | 'summary';
  render(): string[];
}

export class Counter implements Family {
  readonly type = 'counter';
  readonly #values = new Map<string, number>();
  constructor(
    readonly name: string,
    readonly help: string,
  ) {}
  inc(labels: Labels = {}, by = 1): void {
    const k = key(labels);
    this.#values.set(k, (this.#values.get(k) ?? 0) + by);
  }
  render(): string[] {
    return samples(this.name, this.#values);
  }
}

export class Gauge implements Family {
  readonly type = 'gauge';
  readonly #values = new Map<string, number>();
  /** Gauges computed at scrape time replace their values from this callback. */
  constructor(
    readonly name: string,
    readonly help: string,
    readonly collect?: (set: (labels: Labels, v: number) => void) => void,
  ) {}
  set(labels: Labels, v: number): void {
    this.#values.set(key(labels), v);
  }
  render(): string[] {
    if (this.collect) {
      this.#values.clear();
      this.collect((l, v) => this.set(l, v));
    }
    return samples(this.name, this.#values);
  }
}

export class Summary implements Family {
  readonly type = 'summary';
  #window: number[] = [];
  #sum = 0;
  #count = 0;
  constructor(
    readonly name: string,
    readonly help: string,
    readonly quantiles: number[] = [0.5, 0.9, 0.99],
    readonly windowSize = 1024,
  ) {}
  observe(v: number): void {
    this.#sum += v;
    this.#count++;
    this.#window.push(v);
    if (this.#window.length > this.windowSize) this.#window.shift();
  }
  render(): string[] {
    const sorted = [...this.#window].sort((a, b) => a - b);
    const q = (p: number) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))]! : NaN);
    return [
      ...this.quantiles.map((p) => `${this.name}{quantile="${p}"} ${fmt(q(p))}`),
      `${this.name}_sum ${fmt(this.#sum)}`,
      `${this.name}_count ${this.#count}`,
    ];
  }
}

export class Registry {
  readonly #families: Family[] = [];
  add<F extends Family>(f: F): F {
    this.#families.push(f);
    return f;
  }
  render(): string {
    const out: string[] = [];
    for (const f of this.#families) {
      out.push(`# HELP ${f.name} ${f.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`, `# TYPE ${f.name} ${f.type}`, ...f.render());
    }
    return out.join('\n') + '\n';
  }
}

/** Labels of tether_peer_refused_total (see its help text). */
export const PEER_REFUSAL_REASONS = [
  'unauthenticated_cap',
  'handshake_timeout',
  'frame_too_large',
  'auth_failed',
  'closed',
  'handshake_error',
] as const;

/** tether's metrics, one set per daemon. */
export class TetherMetrics {
  readonly registry = new Registry();
  readonly migrations = this.registry.add(new Counter('tether_migrations_total', 'Migrations that ended, by role and outcome.'));
  readonly rollbacks = this.registry.add(new Counter('tether_rollbacks_total', 'Rollbacks on the source, by reason.'));
  readonly staleResolves = this.registry.add(
    new Counter(
      'tether_stale_resolves_total',
      'Source answers (resolve) this host refused, unacted on, because they name another migration of the VM than the one it holds.',
    ),
  );
  readonly checkpointsApplied = this.registry.add(
    new Counter('tether_checkpoints_applied_total', 'Checkpoints applied and acknowledged by this host as a source.'),
  );
  readonly checkpointBytes = this.registry.add(
    new Counter('tether_checkpoint_bytes_total', 'Bytes of checkpoints applied by this host as a source.'),
  );
  readonly pause = this.registry.add(
    new Summary('tether_checkpoint_pause_seconds', 'VM pause per checkpoint on the destination (stop to cont).'),
  );
  readonly restore = this.registry.add(new Summary('tether_rollback_restore_seconds', 'Rollback decision to VM running on the source.'));
  readonly gateHeldBytes = this.registry.add(
    new Gauge('tether_gate_held_bytes', 'Bytes of guest frames held by a NIC gate, by vm and nic.'),
  );
  readonly gateHeldFrames = this.registry.add(new Gauge('tether_gate_held_frames', 'Guest frames held by a NIC gate, by vm and nic.'));
  readonly gateHeldBytesMax = this.registry.add(
    new Gauge('tether_gate_held_bytes_max', 'Highest tether_gate_held_bytes since the NIC was set up on this host, by vm and nic.'),
  );
  readonly gateHeldFramesMax = this.registry.add(
    new Gauge('tether_gate_held_frames_max', 'Highest tether_gate_held_frames since the NIC was set up on this host, by vm and nic.'),
  );
  readonly gateFrames = this.registry.add(
    new Counter(
      'tether_gate_frames_total',
      "Frames through a NIC, by vm, nic and action: passed (pass-through), released (held, then sent on ACK), discarded (dropped by a fence), announced (QEMU's own RARP announce, let out of the window at once).",
    ),
  );
  readonly gateBytes = this.registry.add(new Counter('tether_gate_bytes_total', 'Bytes of frames through a NIC, by vm, nic and action.'));
  readonly gateBackpressure = this.registry.add(
    new Counter('tether_gate_backpressure_total', 'Times a full gate stopped reading from the guest, by vm and nic.'),
  );
  readonly gateOverBoundBytes = this.registry.add(
    new Counter(
      'tether_gate_over_bound_bytes_total',
      'Bytes a NIC gate held beyond gate.maxBytes (held anyway, never dropped; 0 unless the reserve fell short), by vm and nic.',
    ),
  );
  readonly gateOverBoundFrames = this.registry.add(
    new Counter('tether_gate_over_bound_frames_total', 'Frames a NIC gate held beyond gate.maxFrames (held anyway), by vm and nic.'),
  );
  readonly peerRefused = this.registry.add(
    new Counter(
      'tether_peer_refused_total',
      'Connections to the peer port closed before authentication, by reason: unauthenticated_cap (peer.maxUnauthenticated connections were already authenticating), handshake_timeout (not authenticated within peer.handshakeTimeoutMs), frame_too_large (a frame larger than the handshake allows), auth_failed (wrong key), closed (the client left), handshake_error (anything else out of protocol).',
    ),
  );
  readonly nicDropped = this.registry.add(
    new Counter(
      'tether_nic_frames_dropped_total',
      "Guest frames a NIC relay dropped instead of passing them on (destination window only), by vm, nic and reason: runt (shorter than an Ethernet header), malformed (a virtio-net header length other than 12), framing (the relay socket lost its framing; the connection is reset), gate_full (refused at the gate bound: the relay never stops reading QEMU), relay_error (QEMU's in socket could not take a released frame).",
    ),
  );
  readonly relayDetachMs = this.registry.add(
    new Gauge(
      'tether_nic_relay_detach_ms',
      'Duration of the last relay detach at completion (object-del of the capture filter to object-del of the reinjecting one), ms, by vm and nic.',
    ),
  );
  readonly vms: Gauge;

  /** The counters one NIC's gate and port report into. */
  nicCounters(vm: string, nic: string): NicCounters {
    const l = { vm, nic };
    const count = (action: string, frames: number, bytes?: number) => {
      this.gateFrames.inc({ ...l, action }, frames);
      if (bytes !== undefined) this.gateBytes.inc({ ...l, action }, bytes);
    };
    let maxBytes = 0;
    let maxFrames = 0;
    // present (0) from the start: an operator alerts on it becoming non-zero
    this.gateOverBoundBytes.inc(l, 0);
    this.gateOverBoundFrames.inc(l, 0);
    for (const reason of NIC_DROP_REASONS) this.nicDropped.inc({ ...l, reason }, 0);
    return {
      held: (bytes, frames) => {
        this.gateHeldBytes.set(l, bytes);
        this.gateHeldFrames.set(l, frames);
        if (bytes > maxBytes) this.gateHeldBytesMax.set(l, (maxBytes = bytes));
        if (frames > maxFrames) this.gateHeldFramesMax.set(l, (maxFrames = frames));
      },
      passed: (f, b) => count('passed', f, b),
      released: (f, b) => count('released', f, b),
      discarded: (f, b) => count('discarded', f, b),
      backpressure: () => this.gateBackpressure.inc(l),
      overBound: (b, f) => {
        if (b > 0) this.gateOverBoundBytes.inc(l, b);
        if (f > 0) this.gateOverBoundFrames.inc(l, f);
      },
      announced: (f) => count('announced', f),
      dropped: (reason, f) => this.nicDropped.inc({ ...l, reason }, f),
    };
  }

  /**
   * The longest the sidecar's event loop went without running, ms, since start: how long a
   * destination's relay can have left QEMU's out socket unread (QEMU stalls once its send
   * buffer is full; docs/network.md "The relay never stops reading").
   */
  readonly eventLoopDelayMax: Gauge;

  constructor(collectVms: (set: (labels: Labels, v: number) => void) => void) {
    const eld = monitorEventLoopDelay({ resolution: 10 });
    eld.enable();
    this.eventLoopDelayMax = this.registry.add(
      new Gauge(
        'tether_event_loop_delay_max_ms',
        "Longest stall of the sidecar's event loop since it started, ms (bounds how long a window's relay can leave QEMU unread).",
        (set) => set({}, Math.round(eld.max / 1e4) / 100),
      ),
    );
    this.vms = this.registry.add(new Gauge('tether_vms', 'VMs on this host, by state.', collectVms));
    // present (0) from the start: an operator alerts on them rising
    for (const reason of PEER_REFUSAL_REASONS) this.peerRefused.inc({ reason }, 0);
  }
}
