"""Start a whole local Parley: Redis (embedded if none given), migrations, protocol and worker processes.

Used by `make run`, by the tests that need real processes and by the benchmark, so all three
start Parley the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from embedded_redis import EmbeddedRedis, free_port

REPO = Path(__file__).resolve().parent.parent
PARLEY = str(REPO / "bin" / "parley")


class Stack:
    def __init__(self, env: dict[str, str] | None = None, log_dir: Path | None = None) -> None:
        # A local stack (make run, the tests, the benchmark) may use the development SECRET_KEY.
        self.env = {"PARLEY_DEV": "1", **os.environ, "PYTHON": sys.executable, **(env or {})}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.redis: list[EmbeddedRedis] = []
        self.log_dir = log_dir
        self._logs: list[object] = []

    def ensure_redis(self, shards: int = 1) -> list[str]:
        """Use REDIS_URLS/REDIS_URL from the environment, or start `shards` throwaway servers."""
        given = self.env.get("REDIS_URLS") or self.env.get("REDIS_URL")
        if given:
            return [u.strip() for u in given.split(",") if u.strip()]
        self.redis = [EmbeddedRedis().start() for _ in range(shards)]
        urls = [r.url for r in self.redis]
        self.env["REDIS_URLS"] = ",".join(urls)
        return urls

    def manage(self, *args: str) -> None:
        subprocess.run([PARLEY, "manage", *args], env=self.env, check=True, cwd=REPO)

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out: object = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
            self._logs.append(out)
        proc = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def start_protocol(self, port: int | None = None, server: str = "daphne", **env: str) -> int:
        port = port or free_port()
        proc_env = {**self.env, "PORT": str(port), "BIND": "127.0.0.1", "PARLEY_SERVER": server, **env}
        self._spawn(f"protocol-{port}", [PARLEY, "protocol"], proc_env)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        return port

    def start_worker(self, *channels: str, **env: str) -> subprocess.Popen[bytes]:
        proc_env = {"PARLEY_METRICS_PORT": "0", **self.env, **env}
        return self._spawn(f"worker-{len(self.processes)}", [PARLEY, "worker", *channels], proc_env)

    def stop_process(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        """Stop one process (SIGTERM, then SIGKILL after `timeout`) and forget it."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.processes:
            self.processes.remove(proc)

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()
        for server in self.redis:
            server.stop()
        for handle in self._logs:
            handle.close()  # type: ignore[attr-defined]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        # Same option the servers use: connections in TIME_WAIT do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def main() -> None:
    """`make run`: one protocol process, one worker, embedded Redis and SQLite unless configured."""
    port = int(os.environ.get("PORT", "8000"))
    if not port_free(port):
        raise SystemExit(f"port {port} is taken; run with PORT=<another port>")
    # `kill`/`timeout` send SIGTERM: stop the children too, not only this launcher.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    stack = Stack(env={"PARLEY_OPEN_REGISTRATION": os.environ.get("PARLEY_OPEN_REGISTRATION", "1")})
    try:
        urls = stack.ensure_redis()
        stack.manage("migrate_locked", "--verbosity", "0")
        stack.manage("seed_demo")
        stack.start_worker()
        server = os.environ.get("PARLEY_SERVER", "daphne")
        stack.start_protocol(port, server=server, BIND=os.environ.get("BIND", "127.0.0.1"))
        print(f"\nParley is running: http://127.0.0.1:{port}  (Redis {', '.join(urls)})", flush=True)
        print("Log in as alice or bob (password parley-demo), or sign up. Ctrl-C stops.", flush=True)
        while all(p.poll() is None for p in stack.processes):
            time.sleep(0.5)
        print("a Parley process exited; stopping", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
