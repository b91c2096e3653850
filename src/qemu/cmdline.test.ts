import t from 'tap';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { VmConfig } from '../config/types.ts';
import { buildQemuArgs, fileNodeOptions, rawNodeOptions, qemuOptValue, shellQuote } from './cmdline.ts';

function vm(over: Partial<VmConfig> = {}): VmConfig {
  return {
    name: 'vm1',
    qemu: { binary: 'qemu-system-x86_64', accel: 'tcg', machine: 'pc', cpu: 'max', extraArgs: [] },
    memoryMiB: 512,
    cpus: 2,
    kernel: '/g/vmlinuz',
    initrd: '/g/initrd.img',
    append: 'console=ttyS0 quiet panic=-1',
    checkpoint: { intervalMs: 50, failoverTimeoutMs: 3000, fenceTimeoutMs: 1500, dirtyTracker: 'auto', hashThreads: 1, window: 3 },
    migration: { precopyMs: 0, maxBandwidth: 0, hotStandby: true },
    ...over,
  };
}
const paths = { ramFile: '/dev/shm/t/vm1.ram', qmpSocket: '/run/t/vm1.qmp', serialLog: '/var/t/vm1.serial' };

t.test('full command line', async (t) => {
  t.same(buildQemuArgs(vm(), paths), [
    '-name',
    'vm1',
    '-accel',
    'tcg',
    '-machine',
    'pc,memory-backend=ram0',
    '-object',
    'memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/t/vm1.ram,share=on',
    '-m',
    '512M',
    '-smp',
    '2',
    '-cpu',
    'max',
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-kernel',
    '/g/vmlinuz',
    '-initrd',
    '/g/initrd.img',
    '-append',
    'console=ttyS0 quiet panic=-1',
    '-chardev',
    'socket,id=qmp0,path=/run/t/vm1.qmp,server=on,wait=off',
    '-mon',
    'chardev=qmp0,mode=control',
    '-chardev',
    'file,id=ser0,path=/var/t/vm1.serial,append=on',
    '-serial',
    'chardev:ser0',
  ]);
});

t.test('no -S: the VM runs as soon as it is loaded', async (t) => {
  t.notOk(buildQemuArgs(vm(), paths, { kind: 'defer' }).includes('-S'));
});

t.test('kvm, no initrd, empty append, extraArgs last', async (t) => {
  const args = buildQemuArgs(
    vm({ qemu: { binary: 'q', accel: 'kvm', machine: 'q35', cpu: 'host,-cx16', extraArgs: ['-device', 'virtio-rng-pci'] }, append: '' }),
    paths,
    { kind: 'defer' },
  );
  const { initrd: _unused, ...noInitrd } = vm();
  t.same(args.slice(args.indexOf('-accel'), args.indexOf('-accel') + 2), ['-accel', 'kvm']);
  t.ok(args.includes('q35,memory-backend=ram0'));
  t.ok(args.includes('host,-cx16'));
  t.notOk(args.includes('-append'));
  t.same(args.slice(-4), ['-incoming', 'defer', '-device', 'virtio-rng-pci']);
  t.notOk(buildQemuArgs(noInitrd, paths).includes('-initrd'));
});

t.test('no kernel: firmware-only boot, no -kernel/-initrd/-append', async (t) => {
  const args = buildQemuArgs(vm({ kernel: '' }), paths);
  for (const o of ['-kernel', '-initrd', '-append']) t.notOk(args.includes(o), o);
});

t.test('incoming exec-file: quoted path and send-configuration=off', async (t) => {
  const args = buildQemuArgs(vm(), paths, { kind: 'exec-file', file: '/s/vm1/devstate' });
  t.same(args.slice(-5), ['-S', '-incoming', "exec:cat '/s/vm1/devstate'", '-global', 'migration.send-configuration=off']);
  const none = buildQemuArgs(vm(), paths);
  t.notOk(none.includes('-incoming'));
  t.notOk(none.includes('-global'));
});

t.test('commas in QemuOpts values are doubled', async (t) => {
  const p = { ramFile: '/shm/a,b.ram', qmpSocket: '/r/q,1.sock', serialLog: '/l/s,x.log' };
  const args = buildQemuArgs(vm(), p);
  t.ok(args.includes('memory-backend-file,id=ram0,size=512M,mem-path=/shm/a,,b.ram,share=on'));
  t.ok(args.includes('socket,id=qmp0,path=/r/q,,1.sock,server=on,wait=off'));
  t.ok(args.includes('file,id=ser0,path=/l/s,,x.log,append=on'));
  t.equal(qemuOptValue('a,,b'), 'a,,,,b');
});

t.test('shellQuote survives /bin/sh with hostile file names', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-q-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  for (const name of ["it's", 'a b', '$(touch pwned)', '`id`', 'x;y', 'q"q', 'back\\slash', '-n', '*']) {
    const file = path.join(dir, name);
    fs.writeFileSync(file, `content of ${name}`);
    // exactly what QEMU does with "exec:<cmd>": /bin/sh -c <cmd>
    const out = execFileSync('/bin/sh', ['-c', `cat ${shellQuote(file)}`], { cwd: dir }).toString();
    t.equal(out, `content of ${name}`, name);
  }
  t.notOk(fs.existsSync(path.join(dir, 'pwned')), 'no command substitution');
});

t.test("NICs: QEMU's tap backend with vnet_hdr on the sidecar's TAP; virtio-net with the configured MAC", async (t) => {
  const v = vm({ nics: [{ mac: '52:54:00:12:34:56', bridge: 'br0', tap: 't0' }] });
  const args = buildQemuArgs(v, { ...paths, nicTaps: ['t0'] });
  const i = args.indexOf('-netdev');
  t.same(args.slice(i, i + 4), [
    '-netdev',
    'tap,id=net0,ifname=t0,script=no,downscript=no,vnet_hdr=on',
    '-device',
    'virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,id=nic0',
  ]);
  t.notOk(
    args.some((a) => a.startsWith('filter-redirector')),
    'steady state: no filter',
  );
  t.throws(() => buildQemuArgs(v, paths), { code: 'ERR_CONFIG_INVALID' }, 'a NIC needs its TAP');
  t.notOk(buildQemuArgs(vm(), paths).includes('-netdev'), 'no NIC, no netdev');
});

t.test('NICs in the window: the indev redirector is created before the outdev one', async (t) => {
  const v = vm({ nics: [{ mac: '52:54:00:12:34:56', bridge: 'br0', tap: 't0' }] });
  const args = buildQemuArgs(v, { ...paths, nicTaps: ['t0'], nicRelays: [{ in: '/s/rin0.sock', out: '/s/rout0.sock' }] });
  const objs = args.filter((a) => a.startsWith('filter-redirector'));
  t.same(objs, [
    'filter-redirector,id=nrin0,netdev=net0,queue=rx,indev=nin0,vnet_hdr_support=on',
    'filter-redirector,id=nrout0,netdev=net0,queue=rx,outdev=nout0,vnet_hdr_support=on',
  ]);
  t.ok(args.includes('socket,id=nin0,path=/s/rin0.sock,server=on,wait=off'));
  t.ok(args.includes('socket,id=nout0,path=/s/rout0.sock,server=on,wait=off'));
});

t.test("disk, steady state: a raw node over QEMU's own file node (O_DIRECT) under virtio-blk", async (t) => {
  const disk = { image: '/srv/a,b.img', journalMaxBytes: 268435456, journalSegmentBytes: 134217728, reconnectDelaySec: 30 };
  const args = buildQemuArgs(vm({ disk }), paths);
  const i = args.indexOf('-blockdev');
  t.same(args.slice(i, i + 6), [
    '-blockdev',
    'driver=file,node-name=f0,filename=/srv/a,,b.img,cache.direct=on,discard=unmap',
    '-blockdev',
    'driver=raw,node-name=disk0,file=f0,discard=unmap',
    '-device',
    'virtio-blk-pci,drive=disk0,id=vda',
  ]);
  t.notOk(
    args.some((a) => a.includes('nbd')),
    'no NBD outside the window',
  );
  t.notOk(buildQemuArgs(vm(), paths).includes('-blockdev'), 'no disk, no blockdev');
  // the same nodes, as the switch at completion adds and reopens them over QMP
  t.same(fileNodeOptions('/srv/a,b.img'), {
    driver: 'file',
    'node-name': 'f0',
    filename: '/srv/a,b.img',
    cache: { direct: true },
    discard: 'unmap',
  });
  t.same(rawNodeOptions('f0'), { driver: 'raw', 'node-name': 'disk0', file: 'f0', discard: 'unmap' });
});

t.test("disk, destination window: the same raw node and device over the sidecar's NBD export", async (t) => {
  const disk = { image: '/srv/vm1.img', journalMaxBytes: 268435456, journalSegmentBytes: 134217728, reconnectDelaySec: 30 };
  const args = buildQemuArgs(vm({ disk }), { ...paths, nbdSocket: '/run/t,x/nbd.sock' }, { kind: 'defer' });
  const i = args.indexOf('-blockdev');
  t.same(args.slice(i, i + 6), [
    '-blockdev',
    'driver=nbd,node-name=nbd0,server.type=unix,server.path=/run/t,,x/nbd.sock,export=vm1,reconnect-delay=30,discard=unmap',
    '-blockdev',
    'driver=raw,node-name=disk0,file=nbd0,discard=unmap',
    '-device',
    'virtio-blk-pci,drive=disk0,id=vda',
  ]);
  const steady = buildQemuArgs(vm({ disk }), paths);
  t.equal(args[args.lastIndexOf('-device') + 1], steady[steady.lastIndexOf('-device') + 1], 'guest-visible device identical');
});
