/**
 * The PostgreSQL client of the real-application scenarios: Debian's `psql` in the client
 * namespace, one connection for the whole test, inserting rows with a client-chosen id
 * and a random payload, one transaction after the other. It records what the server
 * acknowledged (a COMMIT command tag) and verifyRows() checks the table against it later,
 * over a new connection, on whichever host runs the VM.
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { GUEST_IP } from '../topology.ts';
import { waitFor } from '../proc.ts';
import type { Cluster } from '../cluster.ts';
import type { Test } from 'tap';

const TABLE = 'tether_rows';

function psqlArgs(c: Cluster): string[] {
  // -X: no ~/.psqlrc; stdbuf: psql's stdout to a pipe would be block-buffered, and each
  // command tag must reach the test as soon as psql has it.
  return ['netns', 'exec', c.clientNs, 'stdbuf', '-oL', 'psql', '-X', '-h', GUEST_IP, '-U', 'postgres', '-d', 'postgres'];
}

/** One psql command over a new connection (create the table, read it back). */
export function psql(c: Cluster, sql: string): string {
  return c.inClient('psql', [
    '-X',
    '-At',
    '-F',
    ' ',
    '-v',
    'ON_ERROR_STOP=1',
    '-h',
    GUEST_IP,
    '-U',
    'postgres',
    '-d',
    'postgres',
    '-c',
    sql,
  ]);
}

export function createTable(c: Cluster): void {
  psql(c, `CREATE TABLE IF NOT EXISTS ${TABLE} (id bigint PRIMARY KEY, payload text NOT NULL)`);
}

/**
 * Continuous inserts over one psql connection: writes `BEGIN; INSERT; COMMIT; \echo acked ID`
 * for the next id as soon as the previous one is acknowledged. A transaction is acknowledged
 * when psql printed `COMMIT` (the server's CommandComplete after the commit record is
 * flushed, synchronous_commit=on) right before its `acked ID` line.
 */
export class PgWriter {
  readonly proc: ChildProcess;
  /** id -> payload of every transaction sent (committed or not). */
  readonly sent = new Map<number, string>();
  /** id -> when (ms epoch) its transaction was written to psql. */
  readonly sentAt = new Map<number, number>();
  /** Acknowledged ids with the time (ms epoch) the acknowledgement arrived. */
  readonly acked: { id: number; t: number }[] = [];
  readonly errors: string[] = [];
  #next = 1;
  #lastLine = '';
  #stopping = false;
  #exited: Promise<void>;

  constructor(
    readonly c: Cluster,
    readonly log = path.join(c.dir, 'pgwriter.log'),
  ) {
    this.proc = spawn('ip', [...psqlArgs(c), '-v', 'ON_ERROR_STOP=1'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let buf = '';
    this.proc.stdout!.on('data', (d: Buffer) => {
      fs.appendFileSync(this.log, d);
      buf += d.toString('utf8');
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        this.#line(buf.slice(0, nl).trim());
        buf = buf.slice(nl + 1);
      }
    });
    this.proc.stderr!.on('data', (d: Buffer) => {
      fs.appendFileSync(this.log, d);
      this.errors.push(d.toString('utf8'));
    });
    this.proc.stdin!.on('error', (e) => this.errors.push(`stdin: ${e.message}`));
    this.#exited = new Promise((resolve) => this.proc.once('exit', () => resolve()));
    this.#send();
  }

  #line(line: string): void {
    if (!line) return;
    const m = /^acked (\d+)$/.exec(line);
    if (m) {
      const id = Number(m[1]);
      if (this.#lastLine === 'COMMIT') this.acked.push({ id, t: Date.now() });
      else this.errors.push(`transaction ${id} ended with ${this.#lastLine}, not COMMIT`);
      if (!this.#stopping) this.#send();
    }
    this.#lastLine = line;
  }

  #send(): void {
    const id = this.#next++;
    const payload = randomBytes(24).toString('hex');
    this.sent.set(id, payload);
    this.sentAt.set(id, Date.now());
    this.proc.stdin!.write(`BEGIN;\nINSERT INTO ${TABLE} (id, payload) VALUES (${id}, '${payload}');\nCOMMIT;\n\\echo acked ${id}\n`);
  }

  get exited(): boolean {
    return this.proc.exitCode !== null || this.proc.signalCode !== null;
  }

  /** Acknowledgements that arrived at or after `since`. */
  ackedSince(since: number): number {
    return this.acked.filter((a) => a.t >= since).length;
  }

  /** Acknowledged transactions that were sent at or after `since`. */
  ackedSentSince(since: number): number {
    return this.acked.filter((a) => (this.sentAt.get(a.id) ?? 0) >= since).length;
  }

  /** Wait for `count` acknowledgements arriving at or after `since` (ms epoch). */
  async waitAcked(count: number, what: string, since = 0): Promise<void> {
    await waitFor(() => {
      if (this.exited) throw new Error(`psql exited while waiting for ${what}: ${this.errors.join('').slice(-1500)}`);
      return this.ackedSince(since) >= count;
    }, `${count} acknowledged commits ${what} (${this.log})`);
  }

  /** Let the transaction in flight finish, then end psql (EOF on its input). */
  async stop(): Promise<void> {
    if (this.exited) return;
    this.#stopping = true;
    const n = this.sent.size;
    await waitFor(() => this.exited || this.acked.length >= n, 'the last transaction acknowledged', 60_000).catch((e: Error) => {
      // stop() runs in teardown too, after a failure: end psql anyway; the log says why it waited
      this.errors.push(`stop: ${e.message}\n`);
    });
    this.proc.stdin!.end();
    const timer = setTimeout(() => this.kill(), 10_000);
    await this.#exited;
    clearTimeout(timer);
  }

  kill(): void {
    if (this.proc.pid && !this.exited) {
      try {
        process.kill(this.proc.pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
  }
}

/** Create the table and start a writer; the test's teardown kills psql if still running. */
export function startWriter(t: Test, c: Cluster): PgWriter {
  createTable(c);
  const w = new PgWriter(c);
  t.teardown(() => w.kill());
  return w;
}

export interface RowCheck {
  acked: number;
  rows: number;
  /** Acknowledged ids missing or with another payload. */
  lost: string[];
  /** Rows the client never sent, or whose payload is not the one it sent. */
  phantom: string[];
  /** Rows sent whose COMMIT never reached the client (the transaction in flight at an interruption). */
  unacked: number[];
}

/**
 * Read the table over a new connection and compare: every acknowledged commit present
 * with its payload, nothing the client did not send. A row sent but never acknowledged
 * may be present only as the one transaction that was in flight (its commit may have
 * happened with the acknowledgement lost).
 */
export function verifyRows(c: Cluster, w: PgWriter): RowCheck {
  const rows = new Map<number, string>();
  for (const line of psql(c, `SELECT id, payload FROM ${TABLE} ORDER BY id`).split('\n')) {
    if (!line) continue;
    const [id, payload] = line.split(' ');
    rows.set(Number(id), payload ?? '');
  }
  const ackedIds = new Set(w.acked.map((a) => a.id));
  const lost: string[] = [];
  for (const id of ackedIds) {
    const got = rows.get(id);
    if (got !== w.sent.get(id)) lost.push(`id ${id}: acknowledged, ${got === undefined ? 'absent' : `payload ${got}`}`);
  }
  const phantom: string[] = [];
  const unacked: number[] = [];
  for (const [id, payload] of rows) {
    if (ackedIds.has(id)) continue;
    if (w.sent.get(id) !== payload) phantom.push(`id ${id}: ${w.sent.has(id) ? 'another payload' : 'never sent'}: ${payload}`);
    else unacked.push(id);
  }
  const maxSent = Math.max(0, ...w.sent.keys());
  // only the last transaction sent can be in doubt: psql sends the next one after the ack
  for (const id of unacked) if (id !== maxSent) phantom.push(`id ${id}: present, never acknowledged, not the one in flight`);
  return { acked: ackedIds.size, rows: rows.size, lost, phantom, unacked };
}
