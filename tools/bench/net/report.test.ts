import t from 'tap';
import { cpuNote } from './report.ts';

t.test("cpuNote: QEMU's and the sidecars' CPU, and the throughput per core of QEMU", async (t) => {
  const s = (cpu: { qemuPct: number | null; sidecarPct: number | null; peerPct?: number | null }) => ({
    tcp: [{ dir: 'g2c' as const, size: 4, mbitPerS: 600, cpu }],
  });
  t.equal(cpuNote(s({ qemuPct: 50, sidecarPct: 67 }), 'g2c', 4), 'CPU: QEMU 50%, sidecar 67%; 1200 Mbit/s per core of QEMU');
  t.equal(
    cpuNote(s({ qemuPct: 150, sidecarPct: 1, peerPct: 30 }), 'g2c', 4),
    "CPU: QEMU 150%, sidecar 1%, source's sidecar 30%; 400 Mbit/s per core of QEMU",
    "the window's sample names the source's sidecar too",
  );
  t.equal(cpuNote(s({ qemuPct: null, sidecarPct: null, peerPct: null }), 'g2c', 4), "CPU: QEMU –%, sidecar –%, source's sidecar –%");
  t.equal(cpuNote(s({ qemuPct: 50, sidecarPct: 0 }), 'c2g', 4), '', 'no sample of that direction: no note');
  t.equal(cpuNote(undefined, 'g2c', 4), '');
});
