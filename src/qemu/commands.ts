import type { QmpExecuteOptions } from '../qmp/client.ts';

/**
 * The QMP commands tether sends, typed once: the argument and reply shapes QEMU 7.2
 * documents (qapi/run-state.json, migration.json, block-core.json, net.json, qom.json,
 * char.json). Callers write `queryMigrate(q)` instead of `q.execute('query-migrate') as {...}`,
 * so a reply field is spelled in one place and a typo is a compile error.
 */

/** Anything that runs a QMP command: the QmpClient, or a test's stand-in for it. */
export interface QmpExecutor {
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts?: QmpExecuteOptions): Promise<T>;
}

/** query-status: the VM's run state (`running`, `paused`, `inmigrate`, `postmigrate`, `suspended`, ...). */
export interface StatusInfo {
  status: string;
  running?: boolean;
}

/** query-migrate: the outgoing or incoming migration's state. Only the fields tether reads. */
export interface MigrationInfo {
  /** absent before any migration; `setup`, `active`, `postcopy-active`, `completed`, `failed`, ... */
  status?: string;
  'error-desc'?: string;
  ram?: { transferred?: number; remaining?: number; total?: number; 'postcopy-requests'?: number };
}

/** One node of query-named-block-nodes (flat). */
export interface BlockNodeInfo {
  'node-name'?: string;
  drv?: string;
}

/** Migration states in which QEMU is still moving (or cancelling) a stream. */
export const MIGRATION_ACTIVE: readonly string[] = ['active', 'setup', 'cancelling', 'pre-switchover', 'device'];

export const queryStatus = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<StatusInfo> =>
  q.execute<StatusInfo>('query-status', undefined, opts);

export const queryMigrate = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<MigrationInfo> =>
  q.execute<MigrationInfo>('query-migrate', undefined, opts);

export const queryCommands = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<{ name: string }[]> =>
  q.execute<{ name: string }[]>('query-commands', undefined, opts);

export const queryMigrateCapabilities = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<{ capability: string; state?: boolean }[]> =>
  q.execute('query-migrate-capabilities', undefined, opts);

export const queryNamedBlockNodes = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<BlockNodeInfo[]> =>
  q.execute<BlockNodeInfo[]>('query-named-block-nodes', { flat: true }, opts);

export const stop = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<void> => q.execute<void>('stop', undefined, opts);

export const cont = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<void> => q.execute<void>('cont', undefined, opts);

export const quit = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<void> => q.execute<void>('quit', undefined, opts);

export const announceSelf = (
  q: QmpExecutor,
  args: { initial: number; max: number; rounds: number; step: number; interfaces?: string[]; id?: string },
  opts?: QmpExecuteOptions,
): Promise<void> => q.execute<void>('announce-self', args, opts);

export const migrateSetCapabilities = (
  q: QmpExecutor,
  capabilities: { capability: string; state: boolean }[],
  opts?: QmpExecuteOptions,
): Promise<void> => q.execute<void>('migrate-set-capabilities', { capabilities }, opts);

export const migrateSetParameters = (q: QmpExecutor, params: Record<string, unknown>, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('migrate-set-parameters', params, opts);

export const migrate = (q: QmpExecutor, uri: string, opts?: QmpExecuteOptions): Promise<void> => q.execute<void>('migrate', { uri }, opts);

export const migrateIncoming = (q: QmpExecutor, uri: string, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('migrate-incoming', { uri }, opts);

export const migrateStartPostcopy = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('migrate-start-postcopy', undefined, opts);

export const migrateContinue = (q: QmpExecutor, state: string, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('migrate-continue', { state }, opts);

export const migrateCancel = (q: QmpExecutor, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('migrate_cancel', undefined, opts);

/** Device state only (no RAM), as COLO uses it: the destination's per-checkpoint device snapshot. */
export const saveDevicesState = (q: QmpExecutor, filename: string, live: boolean, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('xen-save-devices-state', { filename, live }, opts);

export const objectDel = (q: QmpExecutor, id: string, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('object-del', { id }, opts);

export const chardevRemove = (q: QmpExecutor, id: string, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('chardev-remove', { id }, opts);

export const blockdevAdd = (q: QmpExecutor, options: Record<string, unknown>, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('blockdev-add', options, opts);

export const blockdevReopen = (q: QmpExecutor, options: Record<string, unknown>[], opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('blockdev-reopen', { options }, opts);

export const blockdevDel = (q: QmpExecutor, nodeName: string, opts?: QmpExecuteOptions): Promise<void> =>
  q.execute<void>('blockdev-del', { 'node-name': nodeName }, opts);

/** object-add of a QOM object (e.g. the migration stream's tls-creds-psk): `args` carries qom-type, id and its properties. */
export const objectAdd = (
  q: QmpExecutor,
  args: { 'qom-type': string; id: string } & Record<string, unknown>,
  opts?: QmpExecuteOptions,
): Promise<void> => q.execute<void>('object-add', args, opts);
