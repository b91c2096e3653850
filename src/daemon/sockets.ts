/** The daemon's listening sockets: TCP or unix, with a typed error (ERR_LISTEN) when the address is taken. */
import net from 'node:net';
import { TetherError } from '../errors.ts';

export function listen(server: net.Server, opts: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) =>
      reject(new TetherError('ERR_LISTEN', `cannot listen on ${opts.path ?? `${opts.host}:${opts.port}`}: ${e.code ?? e.message}`)),
    );
    server.listen(opts, () => resolve());
  });
}

/**
 * Listen on a unix socket that is 0600 from the moment it exists: the umask is narrowed
 * around listen(), whose bind() runs synchronously inside the call (a chmod after listen
 * would leave a window in which any local user could connect and drive the daemon).
 */
export function listenPrivate(server: net.Server, socketPath: string): Promise<void> {
  const old = process.umask(0o177);
  try {
    return listen(server, { path: socketPath });
  } finally {
    process.umask(old);
  }
}

/** `host:port` (an IPv6 host in brackets) as the CLI and the migration marker give a peer. */
export function parseHostPort(s: string): { host: string; port: number } {
  const m = /^(.+):(\d{1,5})$/.exec(s);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port < 1 || port > 65535) throw new TetherError('ERR_USAGE', `'${s}' is not host:port`);
  return { host: m[1]!.replace(/^\[(.*)\]$/, '$1'), port };
}
