/**
 * The real-application guest (issue 14, docs/apps.md): a Debian bookworm image with
 * memcached, PostgreSQL 15 and nginx, booted from its own disk (root=/dev/vda), which is
 * the VM's disk served through tether, so every write of the OS and its services goes
 * through the journal during a migration. tools/guest/debian/build.sh builds it once
 * (about a minute, cached by a content key); tests call debianGuest() first.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { Test } from 'tap';
import { Cluster } from '../cluster.ts';
import { ROOT } from '../topology.ts';
import { waitFor } from '../proc.ts';
import type { ClusterOptions } from '../topology.ts';

export interface DebianGuest {
  kernel: string;
  initrd: string;
  image: string;
  /** sha256 of /big.bin, the file nginx serves. */
  bigSha256: string;
  bigBytes: number;
}

let built: DebianGuest | undefined;

/** Install the host's tools and clients if missing (deps.sh), build or find the Debian guest (build.sh). */
export function debianGuest(): DebianGuest {
  if (built) return built;
  execFileSync(path.join(ROOT, 'tools', 'guest', 'debian', 'deps.sh'), { stdio: ['ignore', 'inherit', 'inherit'] });
  const out = execFileSync(path.join(ROOT, 'tools', 'guest', 'debian', 'build.sh'), {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const get = (k: string) => {
    const m = new RegExp(`^${k}=(.*)$`, 'm').exec(out);
    if (!m) throw new Error(`tools/guest/debian/build.sh printed no ${k}=: ${out}`);
    return m[1]!;
  };
  const image = get('image');
  const manifest = fs.readFileSync(path.join(path.dirname(image), 'manifest.txt'), 'utf8');
  const sha = /^big_bin_sha256=([0-9a-f]{64})$/m.exec(manifest)?.[1];
  const mib = Number(/^big_bin_mib=(\d+)$/m.exec(manifest)?.[1]);
  if (!sha || !mib) throw new Error(`manifest without big_bin_*: ${manifest}`);
  built = { kernel: get('kernel'), initrd: get('initrd'), image, bigSha256: sha, bigBytes: mib * 1024 * 1024 };
  return built;
}

/** Guest RAM of the Debian VM under TCG: enough for the three services, small enough to migrate quickly. */
export const DEBIAN_RAM_MIB = 512;

/**
 * Boot the Debian VM on the source (disk through tether, a gated NIC) and wait for its
 * init's "services up" line on the serial console.
 */
export async function bootDebianCluster(t: Test, opts: ClusterOptions = {}): Promise<Cluster> {
  const g = debianGuest();
  const c = new Cluster({
    guestNet: 'gate',
    ...opts,
    boot: { kernel: g.kernel, initrd: g.initrd, append: 'console=ttyS0 root=/dev/vda rw quiet panic=-1' },
    disk: { guest: 'os', image: g.image, ...opts.disk },
    vm: { memoryMiB: DEBIAN_RAM_MIB, ...opts.vm },
  });
  t.teardown(() => c.cleanup());
  await c.up();
  const started = Date.now();
  const r = await c.tether(c.src, ['vm', 'start', c.vmConfig, '--json']);
  t.equal(r.code, 0, `vm start: ${r.stderr}`);
  await waitServices(c.serialLog(c.src), 0);
  t.comment(`Debian guest: services up ${((Date.now() - started) / 1000).toFixed(1)} s after vm start`);
  return c;
}

/** Wait for tether-init's "services up" after byte `from` of a serial log; fails on its FAILED line. */
export async function waitServices(serialLog: string, from: number): Promise<void> {
  await waitFor(() => {
    let text = '';
    try {
      text = fs.readFileSync(serialLog).subarray(from).toString('latin1');
    } catch {
      /* not there yet */
    }
    const failed = /tether-init: FAILED.*/.exec(text);
    if (failed) throw new Error(`the Debian guest: ${failed[0]} (${serialLog})`);
    return /tether-init: services up/.test(text);
  }, `the Debian guest's services (${serialLog})`);
}
