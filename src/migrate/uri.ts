/**
 * The source never executes what the destination names. The destination answers `prepare`
 * with the URI its QEMU listens on (`ready.uri`), and the source's QEMU would connect to,
 * open or run whatever that URI says: `exec:<command>` runs a shell command, `unix:`,
 * `fd:` and `file:` reach local files and descriptors, `tcp:` to another host sends the
 * guest's RAM there. So the source accepts exactly one form, the one the destination builds
 * (destination.ts #listen):
 *
 *   tcp:<A>:<port>        A = the address this side's peer channel is connected to, in the
 *   tcp:[<A6>]:<port>     canonical form the socket reports; IPv6 in brackets; port 1..65535
 *
 * nothing else (no host name, no other address, no scheme case or whitespace variants, no
 * QEMU socket options after the port), and hands QEMU a URI it builds itself from the
 * checked parts, never the peer's string. There is no unix form: the destination never
 * announces one (the harness and production both migrate over TCP).
 */
import net from 'node:net';
import { TetherError } from '../errors.ts';

const TCP_URI_RE = /^tcp:(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):([1-9][0-9]{0,4})$/;

/** The canonical text of an IP address ('' for anything else). */
function canonicalIp(addr: string): string {
  if (net.isIPv4(addr)) return addr;
  if (!net.isIPv6(addr)) return '';
  // WHATWG URL serializes IPv6 canonically (RFC 5952: lower case, longest zero run as ::).
  return new URL(`http://[${addr}]/`).hostname.slice(1, -1);
}

/** The URI the destination must announce when the peer channel reached it at `address`. */
export function migrationUri(address: string, port: number): string {
  return net.isIPv6(address) ? `tcp:[${address}]:${port}` : `tcp:${address}:${port}`;
}

/**
 * Checks the destination's `ready.uri` against the address the peer channel is connected
 * to (`peerAddress`, the socket's remoteAddress) and returns the URI to give QEMU, built
 * from the checked parts. Anything else throws ERR_PEER_MIGRATION_URI.
 */
export function checkMigrationUri(uri: unknown, peerAddress: string | undefined): string {
  const refuse = (why: string): never => {
    throw new TetherError('ERR_PEER_MIGRATION_URI', `destination named migration URI ${JSON.stringify(uri)}: ${why}`, {
      uri: typeof uri === 'string' ? uri.slice(0, 200) : typeof uri,
      peerAddress: peerAddress ?? null,
    });
  };
  if (typeof uri !== 'string') return refuse('not a string');
  const peer = canonicalIp(peerAddress ?? '');
  if (peer === '') return refuse('the peer channel has no IP address to compare with');
  const m = TCP_URI_RE.exec(uri);
  if (!m) return refuse(`only tcp:<${peer}>:<port> is accepted`);
  const [, v6, v4, portText] = m;
  const port = Number(portText);
  if (port > 65535) return refuse('port out of range');
  if (v4 !== undefined && !net.isIPv4(v4)) return refuse('not an IPv4 address');
  if (v6 !== undefined && !net.isIPv6(v6)) return refuse('not an IPv6 address');
  const host = v6 ?? v4!;
  if (v6 !== undefined && !net.isIPv6(peer)) return refuse(`the peer channel is connected to ${peer}, not to ${host}`);
  if (v4 !== undefined && !net.isIPv4(peer)) return refuse(`the peer channel is connected to ${peer}, not to ${host}`);
  if (canonicalIp(host) !== peer) return refuse(`the peer channel is connected to ${peer}, not to ${host}`);
  return migrationUri(peer, port);
}
