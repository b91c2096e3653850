/**
 * Where a VM is, as this host sees it: the one vocabulary for that question, used by
 * `tether status` (`state`), the `tether_vms{state}` metric and the logs. The phases of
 * a migration (SourcePhase, DestPhase) are the steps of one migration, not places.
 *   stopped        no QEMU here (never started, or `tether vm stop`)
 *   running        its QEMU runs the guest here
 *   migrating-out  running here and being migrated away (this host can still take it back)
 *   migrating-in   arriving here; outputs held until the source acknowledges
 *   rolling-back   resuming here from the last acknowledged checkpoint
 *   fenced         was arriving here, the source kept it: QEMU and RAM gone
 *   gone           completed a migration away: this host holds no copy
 *   recovering     a restarted sidecar has not finished finding this VM again: requests on it
 *                  get ERR_VM_RECOVERING
 *   unrecovered    a restarted sidecar could not bring it to a known state (a damaged marker,
 *                  a failed restore, a QEMU it cannot identify or reach): it left what it found
 *                  as it was, recorded the cause (unrecovered.json, kept across restarts) and
 *                  refuses start, stop, migrations in and out (ERR_VM_UNRECOVERED) until an
 *                  operator runs `tether vm adopt` or `tether vm forget`
 */
export type VmPlace =
  'stopped' | 'running' | 'migrating-out' | 'migrating-in' | 'rolling-back' | 'fenced' | 'gone' | 'recovering' | 'unrecovered';

/** Every VmInstance starts here: `tether vm start`, an incoming migration and a restarted sidecar each construct a fresh one. */
export const INITIAL_PLACE: VmPlace = 'stopped';

/**
 * The moves `vm.place = ...` may make (VmInstance's setter checks them: ERR_STATE_TRANSITION).
 * Derived from every assignment in src/ and every path that can reach it; x → x is always
 * allowed and not logged (the setter skips it). Each entry: to ← the code that moves there.
 *
 * `unrecovered` is reachable from every place: it is the restarted sidecar's catch-all
 * (daemon recovery's `markUnrecovered`, `tether vm adopt` failing), and its failure may come
 * after recovery (or the operator's adopt) already moved the VM on (running, then its NICs
 * failed to open; migrating-in, then the answer wait failed).
 */
export const PLACE_TRANSITIONS: Readonly<Record<VmPlace, readonly VmPlace[]>> = {
  stopped: [
    'running', // VmInstance.boot (`tether vm start`); a destination completing on a VM the operator stopped meanwhile
    'migrating-in', // VmInstance.startIncoming (the destination's fresh instance)
    'recovering', // a restarted sidecar lists every VM it has a record of (daemon #readRecords)
    'fenced', // the destination fences before (or after a failed) startIncoming; a recovered incoming VM the operator stopped, then answered rolled-back
    'unrecovered',
  ],
  running: [
    'stopped', // its QEMU died on its own (VmInstance #watch); `tether vm stop`; `vm start` whose NICs did not connect
    'migrating-out', // `tether migrate` (the daemon, before SourceMigration.run)
    'unrecovered',
  ],
  'migrating-out': [
    'gone', // the source recorded completion
    'running', // refused or unreached: nothing was migrated, the VM runs on here
    'rolling-back', // the source decided to roll back (any reason, incl. a failed setup)
    'stopped', // `tether vm stop` once no migration holds the VM (a run() that ended without a place, e.g. shutdown)
    'unrecovered',
  ],
  'migrating-in': [
    'running', // the destination completed; or the source answered `completed` to a recovered one
    'fenced', // the destination fenced; or the source answered `rolled-back` to a recovered one
    'stopped', // `tether vm stop` on an incoming VM (the daemon does not refuse it)
    'unrecovered',
  ],
  'rolling-back': [
    'running', // the VM was restored here (cold or hot standby, or precopy cancelled)
    'stopped', // the rollback failed: the VM is not running anywhere here
    'gone', // the rollback was given up (#giveUp): the VM continues on the destination
    'unrecovered',
  ],
  fenced: [
    'stopped', // `tether vm stop` (allowed on a fenced VM)
    'unrecovered',
  ],
  gone: [
    'stopped', // `tether vm stop` on a VM a restart found completed; a given-up rollback whose hand-over then failed
    'unrecovered',
  ],
  recovering: [
    'unrecovered', // a cause recorded by an earlier start, or this recovery failed
    'running', // its QEMU adopted (and resumed if paused), or restored from the last checkpoint
    'stopped', // no QEMU to adopt (or `tether vm adopt` with none alive)
    'fenced', // an interrupted incoming migration (or a completing one whose QEMU is gone)
    'gone', // the source had recorded completion before the restart
    'migrating-in', // a completing destination, paused until the source answers
    'rolling-back', // recovery resuming from the last checkpoint through the live rollback's phase code
  ],
  unrecovered: [
    'recovering', // `tether vm adopt`
  ],
};
