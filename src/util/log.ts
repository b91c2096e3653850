/**
 * Structured logs: one JSON object per line on stderr. Fields are stable so
 * operators can filter with jq: {t, level, host, msg, ...fields}.
 */
export type Level = 'debug' | 'info' | 'warn' | 'error';
const RANK: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
}

export function createLogger(
  base: Record<string, unknown>,
  level: Level = 'info',
  sink: (line: string) => void = (l) => process.stderr.write(l + '\n'),
): Logger {
  const min = RANK[level];
  const emit = (lv: Level, msg: string, fields?: Record<string, unknown>) => {
    if (RANK[lv] < min) return;
    const rec: Record<string, unknown> = { t: new Date().toISOString(), level: lv, ...base, msg };
    if (fields) for (const [k, v] of Object.entries(fields)) rec[k] = v instanceof Error ? errorFields(v) : v;
    sink(JSON.stringify(rec));
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
