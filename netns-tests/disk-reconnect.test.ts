/**
 * Real QEMU 7.2 with its disk served by the sidecar's NBD server (the production
 * command line from buildQemuArgs): I/O issued while the server is gone waits, and
 * completes once a new server listens on the same path — a sidecar restart does not
 * fail the guest's I/O. The I/O goes through the virtio-blk device's own BlockBackend
 * (HMP qemu-io -d), the path a guest's requests take. No guest kernel needed.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import type { VmConfig } from '../src/config/types.ts';
import { FileBlockDevice } from '../src/disk/file-device.ts';
import { NbdServer } from '../src/nbd/server.ts';
import { QemuProcess } from '../src/qemu/process.ts';
import { nullLogger } from '../src/util/log.ts';

const MiB = 1024 * 1024;
const BACKEND = '/machine/peripheral/vda/virtio-backend';

t.test('sidecar restart: I/O issued during the outage completes after it', async (t) => {
  const dir = fs.mkdtempSync('/dev/shm/tether-disk-test-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, 16 * MiB);
  const sock = path.join(dir, 'nbd.sock');
  const vm: VmConfig = {
    name: 'diskvm',
    qemu: { binary: 'qemu-system-x86_64', accel: 'tcg', machine: 'pc', cpu: 'max', extraArgs: [] },
    memoryMiB: 64,
    cpus: 1,
    kernel: '',
    append: '',
    checkpoint: { intervalMs: 50, failoverTimeoutMs: 3000, fenceTimeoutMs: 1500, dirtyTracker: 'auto', hashThreads: 1, window: 3 },
    disk: { image, journalMaxBytes: 32 * MiB, journalSegmentBytes: 16 * MiB, reconnectDelaySec: 60 },
    migration: { precopyMs: 0, maxBandwidth: 0, hotStandby: false },
  };
  const dev = await FileBlockDevice.open(image);
  t.teardown(() => dev.close());
  let server = new NbdServer({ device: dev, exportName: vm.name, log: nullLogger });
  await server.listen(sock);
  t.teardown(() => server.close());
  const q = await QemuProcess.start({
    vm,
    ramFile: path.join(dir, 'ram'),
    qmpSocket: path.join(dir, 'qmp.sock'),
    serialLog: path.join(dir, 'serial.log'),
    nbdSocket: sock,
    dieWithParent: true,
  });
  t.teardown(() => q.kill());
  const io = (cmd: string) =>
    q.qmp.execute<string>('human-monitor-command', { 'command-line': `qemu-io -d ${BACKEND} "${cmd}"` }, { timeoutMs: 120_000 });

  // HMP qemu-io prints its report on QEMU's stdout (the log file); the reply carries errors only.
  t.equal(await io('write -P 0x5a 0 4096'), '');
  t.ok(fs.readFileSync(image).subarray(0, 4096).equals(Buffer.alloc(4096, 0x5a)), 'served to the image');

  // The sidecar goes away (socket closed, path unlinked) and comes back 2 s later.
  await server.close();
  const back = new Promise<void>((resolve, reject) =>
    setTimeout(() => {
      server = new NbdServer({ device: dev, exportName: vm.name, log: nullLogger });
      server.listen(sock).then(resolve, reject);
    }, 2000),
  );
  const read = await io('read -P 0x5a 0 4096');
  await back;
  t.equal(read, '', 'the read issued during the outage returned no error');
  t.equal(await io('write -P 0x6b 4096 4096'), '');
  t.equal(await io('flush'), '');
  const log = fs.readFileSync(q.logFile, 'utf8');
  t.match(log, /read 4096\/4096 bytes at offset 0/, 'QEMU reports the read done');
  t.notMatch(log, /Pattern verification failed|failed:/, 'with the data written before the outage');
  t.ok(fs.readFileSync(image).subarray(4096, 8192).equals(Buffer.alloc(4096, 0x6b)), 'later writes land');
});
