/**
 * A device failure reaches the NBD client as the spec's error value, whether it is a system
 * error of Node's fs (its `code`) or a coded ERR_DISK_IO of the image device (details.errno).
 */
import t from 'tap';
import { TetherError } from '../errors.ts';
import * as P from './protocol.ts';
import { nbdErrorOf } from './server.ts';

const sys = (code: string): Error => Object.assign(new Error(code), { code });
const disk = (errno: string): TetherError => new TetherError('ERR_DISK_IO', errno, { errno });

t.test('errno names map to NBD errors, from Node and from ERR_DISK_IO alike', async (t) => {
  for (const [errno, nbd] of [
    ['ENOSPC', P.ENOSPC],
    ['EDQUOT', P.ENOSPC],
    ['EFBIG', P.ENOSPC],
    ['EROFS', P.EPERM],
    ['EPERM', P.EPERM],
    ['EACCES', P.EPERM],
    ['EINVAL', P.EINVAL],
    ['EIO', P.EIO],
  ] as const) {
    t.equal(nbdErrorOf(sys(errno)), nbd, `fs ${errno}`);
    t.equal(nbdErrorOf(disk(errno)), nbd, `ERR_DISK_IO ${errno}`);
  }
  t.equal(nbdErrorOf(new TetherError('ERR_DISK_RANGE', 'past the end')), P.EIO, 'a coded error without errno: EIO');
});
