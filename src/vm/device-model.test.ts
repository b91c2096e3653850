import t from 'tap';
import { parseVmConfig } from '../config/load.ts';
import { deviceModelDigest } from './device-model.ts';

const base = { baseDir: '/etc/tether' };
const vm = (extra: Record<string, unknown> = {}) => parseVmConfig({ name: 'vm1', memoryMiB: 512, kernel: 'k/vmlinuz', ...extra }, base);
const nic = (mac: string, bridge = 'br0', tap = 'tap0') => ({ mac, bridge, tap });

t.test('host-local facts do not change the device model', async (t) => {
  const d = deviceModelDigest(vm({ nics: [nic('52:54:00:00:00:01')], disk: { image: '/a/vm1.img' } }));
  t.equal(
    deviceModelDigest(
      vm({ nics: [nic('52:54:00:00:00:01', 'br-other', 'tapx')], disk: { image: '/mnt/b/vm1.img' }, kernel: '/x/vmlinuz' }),
    ),
    d,
    'bridge, TAP name, image path and kernel path are per host',
  );
});

t.test('what the migration stream depends on changes it', async (t) => {
  const d = deviceModelDigest(vm({ nics: [nic('52:54:00:00:00:01')] }));
  t.not(deviceModelDigest(vm({ nics: [nic('52:54:00:00:00:02')] })), d, 'another MAC');
  t.not(deviceModelDigest(vm()), d, 'no NIC');
  t.not(deviceModelDigest(vm({ nics: [nic('52:54:00:00:00:01'), nic('52:54:00:00:00:03', 'br0', 'tap1')] })), d, 'a second NIC');
  t.not(deviceModelDigest(vm({ nics: [nic('52:54:00:00:00:01')], disk: { image: '/a/vm1.img' } })), d, 'a disk');
  t.not(deviceModelDigest(vm({ nics: [nic('52:54:00:00:00:01')], memoryMiB: 1024 })), d, 'more RAM');
});
