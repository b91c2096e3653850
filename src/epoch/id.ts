import { randomUUID } from 'node:crypto';

/**
 * A migration's id: chosen by the source at `prepare`, a random (version 4) UUID in its
 * canonical lower-case form, 36 characters. Every message that names a migration outside
 * its own channel carries it: a VM migrates many times, and an answer retried for minutes
 * (`resolve`) must never be taken for a later migration of the same VM (docs/completion.md).
 */
export const MIGRATION_ID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

export function newMigrationId(): string {
  return randomUUID();
}

export function isMigrationId(v: unknown): v is string {
  return typeof v === 'string' && v.length === 36 && MIGRATION_ID_RE.test(v);
}
