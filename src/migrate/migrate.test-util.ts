/** Helpers shared by the migration's unit tests (completion/destination, destination/fence). Not production code. */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Test } from 'tap';
import type { HostConfig } from '../config/types.ts';

/**
 * A host with its state under a temporary directory (removed at the test's end) and the
 * config file of a 16 MiB VM `vm1` that never boots (no QEMU in these tests).
 */
export function testHost(t: Test, prefix: string): { dir: string; host: HostConfig; vmFile: string } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const host: HostConfig = {
    name: 'host-d',
    stateDir: path.join(dir, 'state'),
    ramDir: path.join(dir, 'ram'),
    controlSocket: path.join(dir, 'control.sock'),
    vmConfigDir: dir,
    peer: { listen: { host: '127.0.0.1', port: 1 }, key: randomBytes(32) },
    migration: { listenHost: '127.0.0.1', portRange: [49152, 49152] },
    logLevel: 'error',
  };
  const vmFile = path.join(dir, 'vm1.yaml');
  fs.writeFileSync(vmFile, 'name: vm1\nmemoryMiB: 16\nkernel: /nonexistent/vmlinuz\n');
  return { dir, host, vmFile };
}
