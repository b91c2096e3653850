import t from 'tap';
import { isTetherError } from '../errors.ts';
import { checkMigrationUri, migrationUri } from './uri.ts';

const PEER = '10.10.0.2';

t.test('the one accepted form: tcp:<the address the channel reached>:<port>, rebuilt', async (t) => {
  t.equal(checkMigrationUri('tcp:10.10.0.2:49152', PEER), 'tcp:10.10.0.2:49152');
  t.equal(checkMigrationUri('tcp:10.10.0.2:1', PEER), 'tcp:10.10.0.2:1');
  t.equal(checkMigrationUri('tcp:10.10.0.2:65535', PEER), 'tcp:10.10.0.2:65535');
  t.equal(checkMigrationUri('tcp:[::1]:49152', '::1'), 'tcp:[::1]:49152');
  t.equal(checkMigrationUri('tcp:[fd00:0:0::2]:49152', 'fd00::2'), 'tcp:[fd00::2]:49152', 'IPv6 compared canonically');
  t.equal(checkMigrationUri('tcp:[FD00::2]:7', 'fd00::2'), 'tcp:[fd00::2]:7');
});

t.test('what the destination builds is accepted', async (t) => {
  for (const [addr, port] of [
    ['10.10.0.2', 49152],
    ['127.0.0.1', 1],
    ['::1', 65535],
    ['fd00::2', 4000],
  ] as const) {
    t.equal(checkMigrationUri(migrationUri(addr, port), addr), migrationUri(addr, port), addr);
  }
});

t.test('everything else is refused with ERR_PEER_MIGRATION_URI', async (t) => {
  const refused: Array<[unknown, string]> = [
    ['exec:touch /tmp/pwned', 'exec'],
    ['exec:cat > /dev/null', 'exec'],
    ['unix:/run/tether/tether.sock', 'unix'],
    ['fd:3', 'fd'],
    ['file:/etc/shadow', 'file'],
    ['rdma:10.10.0.2:49152', 'rdma'],
    ['tcp:10.10.0.3:49152', 'another host'],
    ['tcp:10.10.0.22:49152', 'another host, same prefix'],
    ['tcp:127.0.0.1:49152', 'loopback'],
    ['tcp:0.0.0.0:49152', 'wildcard'],
    ['tcp:[::ffff:10.10.0.2]:49152', 'v4-mapped'],
    ['TCP:10.10.0.2:49152', 'upper-case scheme'],
    ['Tcp:10.10.0.2:49152', 'mixed-case scheme'],
    [' tcp:10.10.0.2:49152', 'leading space'],
    ['tcp:10.10.0.2:49152 ', 'trailing space'],
    ['tcp:10.10.0.2:49152\n', 'trailing newline'],
    ['tcp: 10.10.0.2:49152', 'space after the scheme'],
    ['tcp:10.10.0.2:49152,to=49160', 'QEMU socket options after the port'],
    ['tcp:10.10.0.2:49152,ipv4', 'QEMU socket options'],
    ['tcp:10.10.0.2:49152;exec:id', 'a second URI'],
    ['tcp:10.10.0.2:0', 'port 0'],
    ['tcp:10.10.0.2:65536', 'port 65536'],
    ['tcp:10.10.0.2:99999', 'port 99999'],
    ['tcp:10.10.0.2:049152', 'leading zero'],
    ['tcp:10.10.0.2:http', 'non-numeric port'],
    ['tcp:10.10.0.2:-1', 'negative port'],
    ['tcp:10.10.0.2:', 'empty port'],
    ['tcp:10.10.0.2', 'missing port'],
    ['tcp::49152', 'missing host'],
    ['tcp:', 'scheme only'],
    ['', 'empty'],
    ['tcp:host-b:49152', 'a host name instead of the address'],
    ['tcp:localhost:49152', 'localhost'],
    ['tcp:10.10.0.2.nip.io:49152', 'a name that embeds the address'],
    ['tcp:010.010.000.002:49152', 'octal-looking address'],
    ['tcp:[10.10.0.2]:49152', 'IPv4 in brackets'],
    ['tcp:10.10.0.2:49152:1', 'extra colon'],
    [42, 'not a string'],
    [null, 'null'],
  ];
  for (const [uri, what] of refused) {
    let err: unknown;
    try {
      checkMigrationUri(uri, PEER);
    } catch (e) {
      err = e;
    }
    t.ok(isTetherError(err, 'ERR_PEER_MIGRATION_URI'), `${what}: ${JSON.stringify(uri)}`);
  }
});

t.test('IPv6: only the bracketed form of the very address', async (t) => {
  const bad = ['tcp:::1:49152', 'tcp:[::2]:49152', 'tcp:[::1%lo]:49152', 'tcp:[::1]:0', 'tcp:[::1]', 'tcp:127.0.0.1:49152'];
  for (const uri of bad) t.throws(() => checkMigrationUri(uri, '::1'), { code: 'ERR_PEER_MIGRATION_URI' }, uri);
  t.throws(() => checkMigrationUri('tcp:[::1]:49152', PEER), { code: 'ERR_PEER_MIGRATION_URI' }, 'v6 URI for a v4 peer');
});

t.test('without a peer address nothing is accepted', async (t) => {
  t.throws(() => checkMigrationUri('tcp:10.10.0.2:49152', undefined), { code: 'ERR_PEER_MIGRATION_URI' });
  t.throws(() => checkMigrationUri('tcp:10.10.0.2:49152', 'host-b'), { code: 'ERR_PEER_MIGRATION_URI' });
});
