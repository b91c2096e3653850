/**
 * A PacketGate for unit tests, its sinks and counters recorded: frames written to the
 * wire, pause/resume calls, the release log, over-bound counts and logged errors.
 */
import { createLogger } from '../util/log.ts';
import { PacketGate } from './gate.ts';
import type { GateCounters, ReleaseRecord } from './gate.ts';
import type { GateReserve } from './reserve.ts';

/** Without `reserve` the gate pauses at the bound itself. */
export function rig(mode: 'pass' | 'gated', maxBytes = 1 << 20, maxFrames = 1000, reserve: GateReserve = { bytes: 0, frames: 0 }) {
  const wire: string[] = [];
  const pauses: boolean[] = [];
  const log: ReleaseRecord[] = [];
  const over = { bytes: 0, frames: 0, calls: 0 };
  const errors: Array<Record<string, unknown>> = [];
  let down = 0;
  const counters: GateCounters = {
    held: () => {},
    passed: () => {},
    released: () => {},
    discarded: () => {},
    backpressure: () => {},
    overBound: (b, f) => {
      over.bytes += b;
      over.frames += f;
      over.calls++;
    },
  };
  const gate = new PacketGate({
    name: 'vm/net0',
    mode,
    maxBytes,
    maxFrames,
    reserve,
    counters,
    log: createLogger({}, 'error', (line) => errors.push(JSON.parse(line) as Record<string, unknown>)),
    sinks: {
      toWire: (fs) => fs.forEach((f) => wire.push(f.toString())),
      pauseGuest: (p) => pauses.push(p),
      onDiscard: () => down++,
    },
    releaseLog: (r) => log.push(r),
  });
  const send = (...s: string[]) => gate.fromGuest(s.map((x) => Buffer.from(x)));
  return { gate, wire, pauses, log, send, over, errors, down: () => down };
}
