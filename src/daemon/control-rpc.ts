/**
 * The control socket (the CLI's): one request per line, its progress lines and its reply
 * (protocol in src/control/codec.ts). One function per method: vm.start, vm.stop, status,
 * migrate, abort here; vm.adopt and vm.forget (an operator resolving an unrecovered VM) in
 * operator.ts.
 */
import path from 'node:path';
import type net from 'node:net';
import { loadVmConfig } from '../config/load.ts';
import { encodeLine, LineDecoder, parseRequest } from '../control/codec.ts';
import type { ControlRequest } from '../control/codec.ts';
import { BlockJournal } from '../disk/journal.ts';
import { isMigrationId } from '../epoch/id.ts';
import { TetherError } from '../errors.ts';
import { SourceMigration } from '../migrate/source.ts';
import { queryNamedBlockNodes } from '../qemu/commands.ts';
import { errorFields, ignored } from '../util/log.ts';
import { VmInstance } from '../vm/instance.ts';
import type { DaemonContext } from './context.ts';
import { settled, vmNamed, vmStatus } from './context.ts';
import { NIC_CONNECT_MS } from './nics.ts';
import { adoptByOperator, forget } from './operator.ts';
import { parseHostPort } from './sockets.ts';

export type Progress = (p: Record<string, unknown>) => void;
type Params = Record<string, unknown>;
type Method = (ctx: DaemonContext, p: Params, progress: Progress) => Promise<unknown>;

/** Serve one CLI connection: its requests run concurrently, each answered by id. */
export function serveControl(ctx: DaemonContext, sock: net.Socket): void {
  const dec = new LineDecoder();
  sock.on('error', ignored(ctx.log, 'a CLI connection reset: its close follows'));
  sock.on('data', (chunk) => {
    let msgs: unknown[];
    try {
      msgs = dec.push(chunk);
    } catch (e) {
      sock.end(encodeLine({ id: 0, error: { code: (e as TetherError).code, message: (e as Error).message } }));
      return;
    }
    for (const raw of msgs) {
      let req: ControlRequest;
      try {
        req = parseRequest(raw);
      } catch (e) {
        sock.write(encodeLine({ id: 0, error: { code: (e as TetherError).code, message: (e as Error).message } }));
        continue;
      }
      answer(ctx, sock, req);
    }
  });
}

function answer(ctx: DaemonContext, sock: net.Socket, req: ControlRequest): void {
  const progress: Progress = (p) => {
    if (!sock.destroyed) sock.write(encodeLine({ id: req.id, progress: p }));
  };
  dispatch(ctx, req, progress).then(
    (result) => !sock.destroyed && sock.write(encodeLine({ id: req.id, result: result ?? null })),
    (e: unknown) => {
      const err = e as TetherError;
      if (!(e instanceof TetherError)) ctx.log.error('control request failed', { method: req.method, error: errorFields(e) });
      if (!sock.destroyed)
        sock.write(encodeLine({ id: req.id, error: { code: err.code ?? 'ERR_INTERNAL', message: err.message, details: err.details } }));
    },
  );
}

const METHODS = new Map<string, Method>([
  ['vm.start', vmStart],
  ['vm.stop', vmStop],
  ['vm.forget', (ctx, p) => forget(ctx, vmParam(p), p.force === true)],
  ['vm.adopt', (ctx, p) => adoptByOperator(ctx, vmNamed(ctx, vmParam(p)))],
  ['status', status],
  ['migrate', migrate],
  ['abort', abort],
]);

async function dispatch(ctx: DaemonContext, req: ControlRequest, progress: Progress): Promise<unknown> {
  const method = METHODS.get(req.method);
  if (!method) throw new TetherError('ERR_USAGE', `unknown method ${req.method}`);
  return method(ctx, req.params, progress);
}

function vmParam(p: Params): string {
  if (typeof p.vm !== 'string' || p.vm === '') throw new TetherError('ERR_USAGE', 'parameter vm (a VM name) is required');
  return p.vm;
}

/** A VM that is not here (or stopped, gone, fenced) may take the name; anything else is in the way. */
function refuseBusyName(ctx: DaemonContext, name: string): void {
  if (ctx.damaged.has(name)) {
    throw new TetherError(
      'ERR_STATE_FILE_CORRUPT',
      `VM ${name}'s record in ${path.join(ctx.host.stateDir, name)} is damaged; its QEMU may still run. ` +
        'Check, remove the directory, then start it',
    );
  }
  const existing = ctx.vms.get(name);
  if (existing) settled(existing);
  if (existing && existing.place !== 'stopped' && existing.place !== 'gone' && existing.place !== 'fenced') {
    throw new TetherError('ERR_VM_EXISTS', `VM ${name} is already ${existing.place} on this host`);
  }
}

async function vmStart(ctx: DaemonContext, p: Params): Promise<unknown> {
  if (typeof p.config !== 'string') throw new TetherError('ERR_USAGE', 'parameter config (path to a VM YAML file) is required');
  const cfg = await loadVmConfig(p.config);
  refuseBusyName(ctx, cfg.name);
  const vm = new VmInstance(ctx.host, cfg, ctx.log);
  ctx.vms.set(cfg.name, vm);
  await ctx.nics.close(vm.name, true);
  const ports = ctx.nics.create(vm, 'pass');
  try {
    for (const port of ports) await port.open(() => vm.qemu?.pid);
    await vm.boot();
    await Promise.all(ports.map((port) => port.waitConnected(NIC_CONNECT_MS)));
  } catch (e) {
    await vm.killQemu().catch(ignored(vm.log, 'a QEMU that failed to boot may be gone already'));
    vm.place = 'stopped';
    await ctx.nics.close(vm.name, true);
    throw e;
  }
  return vmStatus(ctx, vm);
}

async function vmStop(ctx: DaemonContext, p: Params): Promise<unknown> {
  const vm = settled(vmNamed(ctx, vmParam(p)));
  if (ctx.outgoing.has(vm.name)) throw new TetherError('ERR_VM_BUSY', `VM ${vm.name} is migrating; abort first`);
  vm.place = 'stopped';
  await vm.stopQemu();
  await ctx.nics.close(vm.name, true);
  await vm.removeRam();
  return vmStatus(ctx, vm);
}

async function status(ctx: DaemonContext, p: Params): Promise<unknown> {
  if (p.vm === undefined) return { host: ctx.host.name, vms: [...ctx.vms.values()].map((v) => vmStatus(ctx, v)) };
  const vm = vmNamed(ctx, vmParam(p));
  return { ...vmStatus(ctx, vm), ...(vm.config.disk ? { disk: await diskStatus(vm) } : {}) };
}

async function migrate(ctx: DaemonContext, p: Params, progress: Progress): Promise<unknown> {
  const vm = settled(vmNamed(ctx, vmParam(p)));
  if (typeof p.to !== 'string') throw new TetherError('ERR_USAGE', 'parameter to (host:port of the destination daemon) is required');
  const to = parseHostPort(p.to);
  if (vm.place !== 'running') throw new TetherError('ERR_VM_NOT_RUNNING', `VM ${vm.name} is ${vm.place}, not running`);
  if (ctx.outgoing.has(vm.name)) throw new TetherError('ERR_VM_BUSY', `VM ${vm.name} is already migrating`);
  const mig = new SourceMigration({ host: ctx.host, vm, to, onProgress: progress, metrics: ctx.metrics, faults: ctx.faults });
  ctx.outgoing.set(vm.name, mig);
  vm.place = 'migrating-out';
  try {
    const result = await mig.run();
    vm.lastMigration = result as unknown as Record<string, unknown>;
    if (result.outcome === 'completed') {
      ctx.vms.delete(vm.name);
      await ctx.nics.close(vm.name, true);
    }
    return result;
  } finally {
    ctx.outgoing.delete(vm.name);
  }
}

async function abort(ctx: DaemonContext, p: Params): Promise<unknown> {
  const name = vmParam(p);
  // Optional `migration`: abort only that migration (an operator's abort typed while
  // looking at one migration must not stop the next one of the VM).
  if (p.migration !== undefined && !isMigrationId(p.migration)) {
    throw new TetherError('ERR_USAGE', 'parameter migration must be a migration id (as tether status shows it)');
  }
  const out = ctx.outgoing.get(name);
  const inc = out ? undefined : ctx.incoming.get(name);
  const current = out?.id ?? inc?.id;
  if (current !== undefined && p.migration !== undefined && p.migration !== current) {
    throw new TetherError(
      'ERR_MIGRATION_ID_MISMATCH',
      `VM ${name} is in migration ${current}, not ${String(p.migration)}: nothing aborted`,
    );
  }
  if (out) {
    out.abort('operator-abort');
    return { aborted: name, role: 'source', migrationId: out.id };
  }
  if (inc) {
    await inc.fence('operator-abort');
    return { aborted: name, role: 'destination', migrationId: inc.id };
  }
  throw new TetherError('ERR_NO_MIGRATION', `VM ${name} is not migrating on this host`);
}

/**
 * A VM's disk as `tether status <vm>` shows it: `window` while the sidecar serves it (a
 * destination's post-copy window), and QEMU's own answer (query-named-block-nodes: node and
 * driver, e.g. disk0:raw, f0:file) while the VM simply runs here; null while it migrates,
 * so a status poll never adds a QMP command to a migration's. `journal`: the block-write
 * journal's figures while it serves the disk (mode, held bytes and its bound, peak, delays).
 */
async function diskStatus(
  vm: VmInstance,
): Promise<{ image: string; window: boolean; nodes: string[] | null; journal: ReturnType<BlockJournal['figures']> | null }> {
  const q = vm.qemu;
  let nodes: string[] | null = null;
  if (q && !q.hasExited && vm.place === 'running') {
    nodes = await queryNamedBlockNodes(q.qmp, { timeoutMs: 1000 }).then(
      (list) => list.map((n) => `${n['node-name'] ?? '?'}:${n.drv ?? '?'}`),
      (e: unknown) => {
        // a status poll answers without the nodes rather than failing on a busy QEMU
        vm.log.debug('query-named-block-nodes failed: status shows no nodes', { error: errorFields(e) });
        return null;
      },
    );
  }
  // The destination's journal while its window is open (held bytes against its bound).
  const dev = vm.nbd?.device;
  const journal = dev instanceof BlockJournal ? dev.figures() : null;
  return { image: vm.config.disk!.image, window: vm.nbd !== undefined, nodes, journal };
}
