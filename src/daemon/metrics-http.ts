/**
 * `GET /metrics` (Prometheus text format) on the address the host config names, and only
 * there: without `metrics:` in host.yaml nothing listens.
 */
import http from 'node:http';
import type net from 'node:net';
import type { TetherMetrics } from '../metrics/registry.ts';
import { listen } from './sockets.ts';

export async function serveMetrics(metrics: TetherMetrics, at: { host: string; port: number }): Promise<http.Server> {
  const srv = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/metrics') {
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(metrics.registry.render());
    } else res.writeHead(404).end();
  });
  await listen(srv as unknown as net.Server, { host: at.host, port: at.port });
  return srv;
}

/** Stop serving and drop the open connections (a scraper's keep-alive must not hold the process). */
export function closeMetrics(srv: http.Server | undefined): void {
  srv?.close();
  srv?.closeAllConnections();
}
