import { hkdfSync } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { TetherError } from '../errors.ts';
import type { QmpClient } from '../qmp/client.ts';
import type { Logger } from '../util/log.ts';
import { errorFields, ignored } from '../util/log.ts';
import { migrateSetParameters, objectAdd, objectDel } from '../qemu/commands.ts';

/**
 * TLS-PSK for QEMU's own migration stream (docs/security.md).
 *
 * Both QEMUs get a `tls-creds-psk` object at run time (QMP `object-add`, so the command
 * lines do not change) and the migration parameter `tls-creds`: D's QEMU then completes a
 * TLS handshake before it reads a byte of vmstate, and refuses any connection that does not
 * prove the key; S's QEMU sends RAM and device state encrypted and authenticated.
 *
 * The key is per migration: HKDF-SHA256 of the peer key (salt: the migration id). Both
 * sidecars know both after the authenticated peer handshake, nothing about it travels, and
 * a key that leaks is good for one migration only. QEMU reads it from `<dir>/keys.psk`
 * (`username:hexkey`); the directory is created 0700 and the file 0600 with O_EXCL
 * (their final permissions from the start) inside the VM's state dir. The client (S) reads
 * the file once, at object-add, so S deletes it at once; the server (D) reads it at each
 * handshake, so D keeps it until its VM runs (the handshake is over by then).
 */

/** QOM id of the credentials object, on both sides. */
export const STREAM_TLS_ID = 'tether-stream-tls';
/** PSK identity: the server's keys.psk holds one line for it, the client presents it. */
export const STREAM_TLS_USER = 'tether';
/** Directory of the key files, under the VM's state dir. */
export const STREAM_TLS_DIR = 'stream-tls';
const HKDF_INFO = 'tether qemu-migration psk';

/**
 * RFC 7919 ffdhe2048, as PKCS#3 PEM. Without a dh-params.pem in its dir, QEMU's PSK server
 * generates 2048-bit DH parameters at object-add (measured: ~0.7 s of CPU on the
 * destination, during the migration's setup). A published group is as good for DHE-PSK;
 * the handshake normally picks ECDHE-PSK anyway.
 */
const FFDHE2048_PEM = `-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
`;

/** The migration stream's pre-shared key: 32 bytes, from the peer key and the migration id. */
export function streamPsk(peerKey: Buffer, migrationId: string): Buffer {
  return Buffer.from(hkdfSync('sha256', peerKey, Buffer.from(migrationId, 'utf8'), HKDF_INFO, 32));
}

/** The one line of keys.psk (GnuTLS psktool format). */
export function pskFileLine(psk: Buffer): string {
  return `${STREAM_TLS_USER}:${psk.toString('hex')}\n`;
}

/** QMP time budget of the set-up and tear-down commands (a wedged QEMU must not hold a migration). */
const QMP_MS = 5000;

export interface StreamTlsOptions {
  qmp: QmpClient;
  /** The VM's state dir; the key files go to <vmDir>/stream-tls/. */
  vmDir: string;
  /** server: the destination (migrate-incoming); client: the source (migrate). */
  endpoint: 'server' | 'client';
  psk: Buffer;
  log: Logger;
}

/** The credentials of one migration on one QEMU; tearDown() removes them again. */
export class StreamTls {
  readonly dir: string;
  readonly #qmp: QmpClient;
  readonly #log: Logger;
  #down = false;

  private constructor(opts: StreamTlsOptions) {
    this.dir = path.join(opts.vmDir, STREAM_TLS_DIR);
    this.#qmp = opts.qmp;
    this.#log = opts.log;
  }

  /**
   * Writes the key files, adds the credentials object and sets `tls-creds`: from here on
   * this QEMU's migration stream (incoming or outgoing) is TLS or nothing. Throws
   * ERR_STREAM_TLS (after undoing what it did) when any step fails.
   */
  static async setUp(opts: StreamTlsOptions): Promise<StreamTls> {
    const t = new StreamTls(opts);
    try {
      await t.#writeKeys(opts.psk, opts.endpoint === 'server');
      // A QEMU that went through an earlier migration (cancelled before switchover) may still hold one.
      await objectDel(opts.qmp, STREAM_TLS_ID, { timeoutMs: QMP_MS }).catch(ignored(opts.log, 'no earlier credentials object to delete'));
      await objectAdd(
        opts.qmp,
        {
          'qom-type': 'tls-creds-psk',
          id: STREAM_TLS_ID,
          endpoint: opts.endpoint,
          dir: t.dir,
          ...(opts.endpoint === 'client' ? { username: STREAM_TLS_USER } : {}),
        },
        { timeoutMs: QMP_MS },
      );
      await migrateSetParameters(opts.qmp, { 'tls-creds': STREAM_TLS_ID }, { timeoutMs: QMP_MS });
      // The client has read its key (object-add loads it): the file has no further use.
      if (opts.endpoint === 'client') await t.removeKeys();
    } catch (e) {
      await t.tearDown();
      throw new TetherError('ERR_STREAM_TLS', `cannot set up TLS for the migration stream: ${(e as Error).message}`, {
        cause: errorFields(e),
      });
    }
    return t;
  }

  async #writeKeys(psk: Buffer, server: boolean): Promise<void> {
    // A directory left by a crashed sidecar holds an old migration's key: gone before anything.
    await fs.rm(this.dir, { recursive: true, force: true });
    await fs.mkdir(this.dir, { mode: 0o700 });
    const write = async (name: string, text: string) => {
      // O_EXCL, mode 0600 at creation: never readable by others, not even for an instant
      const fh = await fs.open(path.join(this.dir, name), 'wx', 0o600);
      try {
        await fh.writeFile(text);
      } finally {
        await fh.close();
      }
    };
    await write('keys.psk', pskFileLine(psk));
    if (server) await write('dh-params.pem', FFDHE2048_PEM);
  }

  /** Deletes the key files (the object in QEMU keeps what it loaded). */
  async removeKeys(): Promise<void> {
    await fs
      .rm(this.dir, { recursive: true, force: true })
      .catch((e: unknown) => this.#log.warn('cannot remove the migration stream key files', { dir: this.dir, error: errorFields(e) }));
  }

  /**
   * Unsets `tls-creds`, deletes the object and the key files. Idempotent, never throws: a
   * QEMU that is gone took its object with it.
   */
  async tearDown(): Promise<void> {
    if (this.#down) return;
    this.#down = true;
    const gone = ignored(this.#log, 'a QEMU that is gone took its credentials object with it');
    await migrateSetParameters(this.#qmp, { 'tls-creds': '' }, { timeoutMs: QMP_MS }).catch(gone);
    await objectDel(this.#qmp, STREAM_TLS_ID, { timeoutMs: QMP_MS }).catch(gone);
    await this.removeKeys();
  }
}
