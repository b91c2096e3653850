/**
 * The lab VM from the host (docs/lab.md): builds (or finds) the Debian lab guest
 * (tools/guest/debian/lab-build.sh), bundles the lab program of THIS checkout (tools/lab/lab.ts
 * and the tracker code it imports, one ESM file by esbuild), the host-built native addon and a
 * static labwriter into a small ext4 disk (/dev/vdb), adds an empty swap disk (/dev/vdc), boots
 * the guest with QEMU and collects the program's "LAB <json>" lines from the serial console.
 * The guest's root disk is opened with snapshot=on: the cached image is never written.
 */
import { execFileSync, spawn } from 'node:child_process';
import { accessSync, constants, copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface LabGuest {
  kernel: string;
  initrd: string;
  image: string;
}

/** Host tools (deps.sh) and the lab image (lab-build.sh: cached by a content key, ~2 min when new). */
export function labGuest(): LabGuest {
  execFileSync(path.join(ROOT, 'tools', 'guest', 'debian', 'deps.sh'), { stdio: ['ignore', 'inherit', 'inherit'] });
  const out = execFileSync(path.join(ROOT, 'tools', 'guest', 'debian', 'lab-build.sh'), {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const get = (k: string) => {
    const m = new RegExp(`^${k}=(.*)$`, 'm').exec(out);
    if (!m) throw new Error(`lab-build.sh printed no ${k}=: ${out}`);
    return m[1]!;
  };
  return { kernel: get('kernel'), initrd: get('initrd'), image: get('image') };
}

/** The bundle disk: dist/lab.mjs, native/build/Release/tether_native.node, labwriter. */
export function bundleDisk(dir: string): string {
  const b = path.join(dir, 'bundle');
  mkdirSync(path.join(b, 'dist'), { recursive: true });
  mkdirSync(path.join(b, 'native', 'build', 'Release'), { recursive: true });
  execFileSync(
    path.join(ROOT, 'node_modules', '.bin', 'esbuild'),
    [
      path.join(ROOT, 'tools', 'lab', 'lab.ts'),
      '--bundle',
      '--platform=node',
      '--format=esm',
      '--target=node18',
      `--outfile=${path.join(b, 'dist', 'lab.mjs')}`,
      '--log-level=warning',
    ],
    { stdio: ['ignore', 'inherit', 'inherit'] },
  );
  copyFileSync(
    path.join(ROOT, 'native', 'build', 'Release', 'tether_native.node'),
    path.join(b, 'native', 'build', 'Release', 'tether_native.node'),
  );
  execFileSync('gcc', [
    '-O2',
    '-Wall',
    '-static',
    '-pthread',
    '-o',
    path.join(b, 'labwriter'),
    path.join(ROOT, 'tools', 'lab', 'labwriter.c'),
  ]);
  const img = path.join(dir, 'bundle.img');
  execFileSync('mkfs.ext4', ['-q', '-F', '-L', 'tether-lab', '-d', b, img, '64M']);
  return img;
}

export interface LabRun {
  /** The program's LAB lines, parsed. */
  results: Record<string, unknown>[];
  /** Its exit status as lab-init printed it (undefined: no such line). */
  exit: number | undefined;
  /** The whole serial console. */
  console: string;
  seconds: number;
  accel: string;
}

function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/** Boot the lab guest once with `tether.lab=<mode>`; resolves when the guest powers off. */
export async function runLab(mode: 'check' | 'sweep', opts: { memoryMiB?: number; timeoutMs?: number } = {}): Promise<LabRun> {
  const g = labGuest();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'tether-lab-'));
  try {
    const bundle = bundleDisk(dir);
    const swap = path.join(dir, 'swap.img');
    writeFileSync(swap, '');
    execFileSync('truncate', ['-s', '256M', swap]);
    // TCG unless asked (TETHER_LAB_ACCEL=kvm), like every guest of the tests: on this CI
    // machine (nested) /dev/kvm opens but the guest kernel hangs after decompression.
    const accel = process.env['TETHER_LAB_ACCEL'] === 'kvm' && kvmUsable() ? 'kvm' : 'tcg';
    const args = [
      '-accel',
      accel,
      '-machine',
      'q35',
      '-cpu',
      // Not "host"/"max" under KVM: nested hosts (this CI machine) reject their
      // IA32_ARCH_CAPABILITIES MSR.
      accel === 'kvm' ? 'host,-arch-capabilities' : 'max',
      '-smp',
      '2',
      '-m',
      String(opts.memoryMiB ?? 1024),
      '-nographic',
      '-no-reboot',
      '-kernel',
      g.kernel,
      '-initrd',
      g.initrd,
      '-append',
      `console=ttyS0 root=/dev/vda rw ${process.env['TETHER_LAB_VERBOSE'] ? '' : 'quiet '}panic=-1 tether.lab=${mode}`,
      '-drive',
      `file=${g.image},if=virtio,format=raw,snapshot=on`,
      '-drive',
      `file=${bundle},if=virtio,format=raw,readonly=on`,
      '-drive',
      `file=${swap},if=virtio,format=raw`,
      '-nic',
      'none',
    ];
    const started = Date.now();
    const q = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    q.stdout.on('data', (d: Buffer) => (out += d.toString('latin1')));
    q.stderr.on('data', (d: Buffer) => (out += d.toString('latin1')));
    const timer = setTimeout(() => q.kill('SIGKILL'), opts.timeoutMs ?? Number(process.env['TETHER_LAB_TIMEOUT_MS'] ?? 300_000));
    await new Promise<void>((resolve, reject) => {
      q.once('error', reject);
      q.once('exit', () => resolve());
    });
    clearTimeout(timer);
    const results: Record<string, unknown>[] = [];
    for (const m of out.matchAll(/^LAB (\{.*\})\r?$/gm)) results.push(JSON.parse(m[1]!) as Record<string, unknown>);
    const ex = /tether-lab: exit (\d+)/.exec(out);
    return {
      results,
      exit: ex ? Number(ex[1]) : undefined,
      console: out,
      seconds: (Date.now() - started) / 1000,
      accel,
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const mode = process.argv[2] === 'sweep' ? 'sweep' : 'check';
  const r = await runLab(mode);
  process.stdout.write(r.console);
  process.stdout.write(`\naccel ${r.accel}, ${r.seconds.toFixed(1)} s, exit ${r.exit}\n`);
}
