/**
 * The relay's `pauseReading` hook (NicPortOptions): tests of a stalled sidecar set it to
 * make the relay stop reading QEMU's out socket for a while, as a sidecar that stalls
 * would. Production never sets it. While paused, QEMU keeps writing into its end's send
 * buffer; the log records what was queued when reading stopped and resumed.
 */
import type net from 'node:net';
import { monoClockMs } from '../gate/gate.ts';
import type { Logger } from '../util/log.ts';
import { sockInq } from './tap.ts';

export interface ReadPause {
  /** Fires from the first read after this epoch was sealed. */
  epoch: number;
  /** How long reading stops. */
  ms: number;
  /** Reading resumes early once more than this many bytes are queued in the socket. */
  bytes?: number;
}

/** The fd of a connected socket (libuv's handle), or undefined once it is gone. */
export function socketFd(s: net.Socket | undefined): number | undefined {
  return (s as unknown as { _handle?: { fd?: number } } | undefined)?._handle?.fd;
}

/**
 * Stops reading `sock` now and resumes after `p.ms` (or once more than `p.bytes` are
 * queued). `epoch()` and `qemuSndbuf()` are read for the log records only.
 */
export function pauseReading(sock: net.Socket, p: ReadPause, epoch: () => number, qemuSndbuf: () => number, log: Logger): void {
  const fd = socketFd(sock);
  const inq = (): number | null => (fd === undefined || sock.destroyed ? null : sockInq(fd));
  const from = { epoch: epoch(), mono: monoClockMs() };
  sock.pause();
  // (tests find these two records in the daemon's log by their text)
  log.warn('fault injection: relay stops reading', { ms: p.ms, epoch: from.epoch, qemuSndbuf: qemuSndbuf(), queued: inq() });
  const until = from.mono + p.ms;
  const poll = (): void => {
    const q = inq();
    if (monoClockMs() < until && !(p.bytes !== undefined && q !== null && q > p.bytes)) {
      setTimeout(poll, 10);
      return;
    }
    // what QEMU wrote while nobody read: still queued in its socket, all of it read now
    log.warn('fault injection: relay reads again', {
      ms: p.ms,
      pausedMs: Math.round(monoClockMs() - from.mono),
      epochFrom: from.epoch,
      epochTo: epoch(),
      queued: inq(),
      qemuSndbuf: qemuSndbuf(),
    });
    sock.resume();
  };
  setTimeout(poll, 10);
}
