/** SIGKILL a process this sidecar may not have spawned and wait (up to ~5 s) until it is gone. */
export async function killAndWait(pid: number): Promise<boolean> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return true; // already gone
  }
  for (let i = 0; i < 500; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  return false;
}
