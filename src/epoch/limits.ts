/**
 * The checkpoint window's limits (src/migrate/window.ts): checked by the config loader
 * (`checkpointWindow`), by the peer's `prepare` validation and by the window itself.
 */
export const DEFAULT_CHECKPOINT_WINDOW = 3;
export const MAX_CHECKPOINT_WINDOW = 16;
