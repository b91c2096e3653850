/**
 * The `nics` list of a VM config and the TAP names it implies (each NIC has a second TAP for
 * a hot standby: docs/network.md).
 */
import { createHash } from 'node:crypto';
import { describe, invalid, Obj } from './fields.ts';
import type { NicConfig } from './types.ts';

/** Linux interface names: IFNAMSIZ 16 including the NUL; no '/', ':' or whitespace. */
const IFNAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$/;
const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
const MAX_NICS = 8;

/**
 * The second TAP of a NIC, for a hot standby: a single-queue TAP admits one opener, and
 * the running QEMU holds the first (docs/network.md "Hot standby"). Its name is the NIC's
 * TAP name (at most 13 bytes kept) with "-b".
 */
export const altTapName = (tap: string): string => `${tap.slice(0, 13)}-b`;

/** The TAPs a QEMU of a NIC may open, in order of preference. */
export const tapCandidates = (tap: string): string[] => [tap, altTapName(tap)];

/** Default TAP name of NIC i: "<vm>-<i>" when it fits in 15 bytes, else a hash of the VM name. */
export function defaultTapName(vm: string, i: number): string {
  const plain = `${vm}-${i}`;
  if (Buffer.byteLength(plain) <= 15) return plain;
  return `tt${createHash('sha256').update(vm).digest('hex').slice(0, 8)}-${i}`;
}

export function parseNics(list: unknown[] | undefined, vm: string): NicConfig[] {
  if (list === undefined) return [];
  if (list.length > MAX_NICS) invalid('nics', `at most ${MAX_NICS} NICs, got ${list.length}`);
  const nics = list.map((item, i) => {
    const o = new Obj(item, `nics[${i}]`, ['mac', 'bridge', 'tap']);
    const macRaw = o.string('mac');
    const mac = macRaw.toLowerCase();
    if (!MAC_RE.test(mac)) invalid(`nics[${i}].mac`, `must be six hex octets "52:54:00:12:34:56", got ${describe(macRaw)}`);
    const first = parseInt(mac.slice(0, 2), 16);
    if (first & 1) invalid(`nics[${i}].mac`, `must be a unicast address (first octet even), got ${mac}`);
    if (mac === '00:00:00:00:00:00') invalid(`nics[${i}].mac`, 'must not be all zeros');
    const bridge = o.string('bridge');
    if (!IFNAME_RE.test(bridge))
      invalid(`nics[${i}].bridge`, `must be an interface name of 1-15 characters [A-Za-z0-9_.-], got ${describe(bridge)}`);
    const tap = o.optString('tap') ?? defaultTapName(vm, i);
    if (!IFNAME_RE.test(tap))
      invalid(`nics[${i}].tap`, `must be an interface name of 1-15 characters [A-Za-z0-9_.-], got ${describe(tap)}`);
    if (tap === bridge) invalid(`nics[${i}].tap`, `must differ from the bridge ${bridge}`);
    if (altTapName(tap) === bridge)
      invalid(`nics[${i}].tap`, `its second TAP ${altTapName(tap)} (a hot standby's) would be the bridge ${bridge}`);
    return { mac, bridge, tap };
  });
  for (let i = 0; i < nics.length; i++) {
    for (let j = 0; j < i; j++) {
      if (nics[j]!.mac === nics[i]!.mac) invalid(`nics[${i}].mac`, `duplicates nics[${j}].mac ${nics[i]!.mac}`);
      if (nics[j]!.tap === nics[i]!.tap) invalid(`nics[${i}].tap`, `duplicates nics[${j}].tap ${nics[i]!.tap}`);
      // each NIC also has a second TAP for a hot standby (src/net/tap.ts): no name may be shared
      const mine = tapCandidates(nics[i]!.tap);
      if (tapCandidates(nics[j]!.tap).some((n) => mine.includes(n)))
        invalid(`nics[${i}].tap`, `its TAPs ${mine.join(', ')} overlap those of nics[${j}] (${tapCandidates(nics[j]!.tap).join(', ')})`);
    }
  }
  return nics;
}
