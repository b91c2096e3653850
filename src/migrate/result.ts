import type { StreamingSummary } from '../util/summary.ts';

/**
 * continued-on-destination: the source decided to roll back but could not restore (its last
 * checkpoint not whole, no standby QEMU could load it); the destination was reachable, so the
 * source gave the rollback up (recorded durably) and the VM continues there.
 */
export type Outcome = 'completed' | 'rolled-back' | 'failed' | 'continued-on-destination';

export interface RollbackFigures {
  reason: string;
  /** Checkpoint the VM resumed from (0 = the source's own state at switchover; null = before switchover). */
  epoch: number | null;
  /** From the last message heard from the destination to the rollback decision. */
  detectMs: number;
  /** From the decision to the VM running again on the source (kill + start + load + announce). */
  restoreMs: number;
  killMs: number;
  startMs: number;
  announceMs: number;
  /** Whether the hot standby took over (false: a fresh QEMU was started). */
  hot?: boolean;
}

export interface MigrationResult {
  vm: string;
  /** The migration's id (the source chose it at `prepare`; both hosts log it). */
  migrationId: string;
  outcome: Outcome;
  reason?: string;
  error?: { code: string; message: string };
  totalMs: number;
  /** From the start to the moment the VM ran on the destination. */
  switchoverMs: number | null;
  checkpoints: number;
  appliedEpoch: number | null;
  tracker: string | null;
  pauseMs: { p50: number; p99: number; max: number } | null;
  checkpointBytes: { avg: number; p50: number; max: number; total: number } | null;
  rollback?: RollbackFigures;
  /**
   * Completed only: whether the destination confirmed the answer to its completion request
   * ('pending': not yet; the source keeps telling it, and the destination holds the guest paused).
   */
  handover?: 'confirmed' | 'unknown' | 'gave-up' | 'pending';
}

export function summarize(s: StreamingSummary): { p50: number; p99: number; max: number } | null {
  if (s.count === 0) return null;
  return { p50: round(s.quantile(50)), p99: round(s.quantile(99)), max: round(s.max) };
}

export const round = (v: number, digits = 2): number => Math.round(v * 10 ** digits) / 10 ** digits;

/** Exit codes of `tether migrate`: the contract scripts rely on. */
export const EXIT = { completed: 0, usage: 2, rolledBack: 3, failed: 4, continuedOnDestination: 5 } as const;
