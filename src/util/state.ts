import { TetherError } from '../errors.ts';
import type { Level, Logger } from './log.ts';

/**
 * A lifecycle with checked transitions: every move names its old state, an
 * illegal move throws ERR_STATE_TRANSITION, and every move is logged (at `level`: info by
 * default; a chatty lifecycle such as a QMP connection's logs at debug).
 */
export class StateMachine<S extends string> {
  #state: S;
  readonly #allowed: Readonly<Record<S, readonly S[]>>;
  readonly #log: Logger | undefined;
  readonly #what: string;
  readonly #level: Level;
  readonly #listeners: ((from: S, to: S) => void)[] = [];

  constructor(what: string, initial: S, allowed: Record<S, readonly S[]>, log?: Logger, level: Level = 'info') {
    this.#what = what;
    this.#level = level;
    this.#state = initial;
    this.#allowed = allowed;
    this.#log = log;
  }

  get state(): S {
    return this.#state;
  }

  is(...states: S[]): boolean {
    return states.includes(this.#state);
  }

  can(to: S): boolean {
    return this.#allowed[this.#state].includes(to);
  }

  to(next: S, fields?: Record<string, unknown>): void {
    const from = this.#state;
    if (!this.can(next)) {
      throw new TetherError('ERR_STATE_TRANSITION', `${this.#what}: illegal transition ${from} -> ${next}`, {
        from,
        to: next,
      });
    }
    this.#state = next;
    this.#log?.[this.#level](`${this.#what} ${from} -> ${next}`, { from, to: next, ...fields });
    for (const l of this.#listeners) l(from, next);
  }

  onChange(fn: (from: S, to: S) => void): void {
    this.#listeners.push(fn);
  }
}
