import net from 'node:net';
import { remoteError, TetherError } from '../errors.ts';
import { encodeLine, LineDecoder } from './codec.ts';

/** One request over the daemon's control socket; progress lines go to onProgress. */
export async function callDaemon(
  socketPath: string,
  method: string,
  params: Record<string, unknown>,
  onProgress?: (p: Record<string, unknown>) => void,
): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection(socketPath);
    const dec = new LineDecoder();
    let done = false;
    const finish = (fn: () => void) => {
      if (done) return;
      done = true;
      sock.destroy();
      fn();
    };
    sock.on('connect', () => sock.write(encodeLine({ id: 1, method, params })));
    sock.on('data', (chunk) => {
      let msgs: unknown[];
      try {
        msgs = dec.push(chunk);
      } catch (e) {
        finish(() => reject(e));
        return;
      }
      for (const m of msgs as Record<string, unknown>[]) {
        if (m.progress && onProgress) onProgress(m.progress as Record<string, unknown>);
        else if ('result' in m) finish(() => resolve(m.result));
        else if (m.error) {
          const err = m.error as { code: string; message: string; details?: Record<string, unknown> };
          finish(() => reject(remoteError(err.code, err.message, err.details)));
        }
      }
    });
    sock.on('error', (e: NodeJS.ErrnoException) =>
      finish(() => reject(new TetherError('ERR_CONTROL_CONNECT', `cannot reach tether daemon at ${socketPath}: ${e.code ?? e.message}`))),
    );
    sock.on('close', () => finish(() => reject(new TetherError('ERR_CONTROL_CLOSED', 'daemon closed the connection'))));
  });
}
