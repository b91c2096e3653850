/**
 * Structured logs: one JSON object per line on stderr. Fields are stable so
 * operators can filter with jq: {t, level, host, msg, ...fields}.
 * When stderr is the journal (systemd's JOURNAL_STREAM names it), each line starts with
 * its sd-daemon priority ("<4>{...}"), which journald strips and records, so
 * `journalctl -u tether -p warning` shows warnings and errors only.
 */
import fs from 'node:fs';

export type Level = 'debug' | 'info' | 'warn' | 'error';
const RANK: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
}

/** sd-daemon(3) priorities of the levels (debug 7, info 6, warning 4, err 3). */
export const JOURNAL_PRIORITY: Record<Level, number> = { debug: 7, info: 6, warn: 4, error: 3 };

/**
 * Whether fd 2 is the journal stream systemd connected: JOURNAL_STREAM is "<dev>:<ino>" of
 * that stream (systemd.exec(5)); a child whose stderr was redirected elsewhere inherits the
 * variable, so the device and inode must match too.
 */
export function stderrIsJournal(
  env: NodeJS.ProcessEnv = process.env,
  fstat: () => { dev: bigint; ino: bigint } = () => fs.fstatSync(2, { bigint: true }),
): boolean {
  const m = /^(\d+):(\d+)$/.exec(env.JOURNAL_STREAM ?? '');
  if (!m) return false;
  try {
    const st = fstat();
    return st.dev === BigInt(m[1]!) && st.ino === BigInt(m[2]!);
  } catch {
    return false;
  }
}

let journal: boolean | undefined;
const stderrSink = (line: string, lv: Level): void => {
  journal ??= stderrIsJournal();
  process.stderr.write(journal ? `<${JOURNAL_PRIORITY[lv]}>${line}\n` : line + '\n');
};

export function createLogger(
  base: Record<string, unknown>,
  level: Level = 'info',
  sink: (line: string, level: Level) => void = stderrSink,
): Logger {
  const min = RANK[level];
  const emit = (lv: Level, msg: string, fields?: Record<string, unknown>) => {
    if (RANK[lv] < min) return;
    const rec: Record<string, unknown> = { t: new Date().toISOString(), level: lv, ...base, msg };
    if (fields) for (const [k, v] of Object.entries(fields)) rec[k] = v instanceof Error ? errorFields(v) : v;
    sink(JSON.stringify(rec), lv);
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (f) => createLogger({ ...base, ...f }, level, sink),
  };
}

export function errorFields(e: unknown): Record<string, unknown> {
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code;
    return { message: e.message, ...(code !== undefined ? { code } : {}) };
  }
  return { message: String(e) };
}

export const nullLogger: Logger = createLogger({}, 'error', () => {});

/**
 * The one way to let a failure go: a promise's `.catch(ignored(log, 'why it may fail'))`.
 * The failure is logged at debug with its reason (a best-effort step: a send on a channel
 * that may already be closed, a cleanup of something that may be gone), never swallowed
 * silently. Anything an operator must see is not "ignored": log it at warn or handle it.
 */
export function ignored(log: Logger | undefined, reason: string): (err: unknown) => void {
  return (err) => log?.debug(`ignored: ${reason}`, { err: errorFields(err) });
}
