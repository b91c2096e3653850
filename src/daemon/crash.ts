/**
 * The daemon-wide policy for an error no code owns (docs/design.md, "Unexpected errors").
 *
 * An error with an owner is handled where it happens: a guest's malformed frame or a TAP
 * that refuses a write is counted and dropped by its NIC, a failed migration step ends that
 * migration (rollback on S, fence on D), a failed recovery leaves that VM unrecovered. What
 * reaches the process unowned (a throw out of an event handler, a rejected promise nobody
 * awaits) means the sidecar's state can no longer be trusted, so it does not go on: it logs
 * the error as one JSON line and exits at once with EX_SOFTWARE (70), without the SIGTERM
 * clean-up (that clean-up would act on the very state in doubt). This is the path a kill -9
 * takes, which every recovery test covers: guests keep running (no byte of a steady-state
 * VM's I/O crosses the sidecar; a destination inside its post-copy window is stopped by its
 * guard and the source resumes the VM), and the service manager's restart recovers every VM
 * from its records.
 */
import { errorFields, type Logger } from '../util/log.ts';

/** sysexits.h EX_SOFTWARE: an internal software error. */
export const EXIT_UNEXPECTED = 70;

export type CrashOrigin = 'uncaughtException' | 'unhandledRejection';

/**
 * What the process does with an unowned error: one log record naming it, then exit(70).
 * `exit` is process.exit in production; a test passes a recorder.
 */
export function onUnexpected(log: Logger, exit: (code: number) => void): (err: unknown, origin: CrashOrigin) => void {
  let exiting = false;
  return (err, origin) => {
    // A second error while the first is being reported changes nothing: one exit.
    if (exiting) return;
    exiting = true;
    try {
      log.error('unexpected error: the sidecar exits now; guests keep running and the next start recovers every VM', {
        origin,
        // the stack too: nothing else will say where it came from
        err: err instanceof Error ? { ...errorFields(err), stack: err.stack } : errorFields(err),
        exitCode: EXIT_UNEXPECTED,
      });
    } finally {
      exit(EXIT_UNEXPECTED);
    }
  };
}

/** Installs the policy on this process (the daemon only: client commands keep Node's default). */
export function installCrashPolicy(log: Logger, exit: (code: number) => void = (c) => process.exit(c)): void {
  const handler = onUnexpected(log, exit);
  process.on('uncaughtException', (err, origin) => handler(err, origin));
  // Node's default for an unhandled rejection is to raise it as uncaughtException (origin
  // 'unhandledRejection'); a listener here names it as such and takes the same path.
  process.on('unhandledRejection', (reason) => handler(reason, 'unhandledRejection'));
}
