"""A Parley deployment on one machine for fault injection, and the faults it can suffer.

Two protocol processes and two workers (`tools/stack.py`, as `make run` and the live tests start
them) on the given PostgreSQL (or SQLite) database and on Redis shards of their own, which this
cluster may kill, restart, pause or cut off. Optional `FaultProxy`s stand between the processes
and Redis or PostgreSQL, for faults of the network rather than of the server.

`endpoints()` is what a Kubernetes Service would route to: the protocol processes that are
running and not draining.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from embedded_redis import EmbeddedRedis, wait_until_up  # noqa: E402
from faults.proxy import FaultProxy  # noqa: E402
from stack import PARLEY, Stack  # noqa: E402

# What every process of a fault cluster runs with, and why:
PROCESS_ENV = {
    # Heartbeats every second: a restarted or drained process is seen (and its rooms) at once.
    "PARLEY_HEARTBEAT_SECONDS": "1",
    # The clients of a case send faster than one person types; the rate limit is not under test.
    "PARLEY_RATE_PER_SECOND": "1000",
    "PARLEY_RATE_BURST": "1000",
    # A drained process's clients come back within 1 s (the default 5 s would only stretch cases).
    "PARLEY_RECONNECT_JITTER_MS": "1000",
    "PARLEY_DRAIN_SECONDS": "10",
    "PARLEY_METRICS_PORT": "0",
}


def libfaketime() -> str | None:
    """libfaketime's preload library: PyPI's `libfaketime` ships one (requirements-dev.txt), Debian's
    `faketime` package another."""
    try:
        import libfaketime as package

        found = Path(package.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
        if found.exists():
            return str(found)
    except ImportError:
        pass
    for candidate in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                      "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"):
        if Path(candidate).exists():
            return candidate
    return None


def skew_env(seconds: float) -> dict[str, str]:
    """Environment that makes a process's wall clock read `seconds` off (monotonic clocks stay)."""
    library = libfaketime()
    if library is None:
        raise RuntimeError("libfaketime not found: pip install libfaketime (requirements-dev.txt)")
    return {"LD_PRELOAD": library, "FAKETIME": f"{seconds:+.0f}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_DONT_RESET": "1"}


@dataclass
class Protocol:
    port: int
    process: subprocess.Popen[bytes]
    draining: bool = False


@dataclass
class Cluster:
    database_url: str
    log_dir: Path
    shards: int = 2
    proxy_redis: bool = False
    proxy_postgres: bool = False
    env: dict[str, str] = field(default_factory=dict)
    protocol_count: int = 2
    worker_count: int = 2

    def __post_init__(self) -> None:
        self.redis: list[EmbeddedRedis] = []
        self.redis_proxies: list[FaultProxy] = []
        self.pg_proxy: FaultProxy | None = None
        self.protocols: list[Protocol] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stack: Stack | None = None

    # Start and stop.

    def start(self) -> Cluster:
        self.redis = [EmbeddedRedis().start() for _ in range(self.shards)]
        urls = [r.url for r in self.redis]
        if self.proxy_redis:
            self.redis_proxies = [FaultProxy("127.0.0.1", r.port).start() for r in self.redis]
            urls = [f"redis://127.0.0.1:{p.port}/0" for p in self.redis_proxies]
        database_url = self.database_url
        if self.proxy_postgres and database_url.startswith("postgres"):
            parts = urlsplit(database_url)
            self.pg_proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
            netloc = parts.netloc.rsplit("@", 1)
            host = f"127.0.0.1:{self.pg_proxy.port}"
            database_url = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
        env = {**PROCESS_ENV, "DATABASE_URL": database_url, "REDIS_URLS": ",".join(urls), **self.env}
        env.pop("REDIS_URL", None)
        self.stack = Stack(env=env, log_dir=self.log_dir)
        for _ in range(self.worker_count):
            self.start_worker()
        for _ in range(self.protocol_count):
            self.start_protocol()
        return self

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        for proxy in [*self.redis_proxies, *([self.pg_proxy] if self.pg_proxy else [])]:
            proxy.stop()
        for server in self.redis:
            server.stop()

    def endpoints(self) -> list[int]:
        return [p.port for p in self.protocols if not p.draining and p.process.poll() is None]

    # Processes.

    def start_protocol(self, **env: str) -> Protocol:
        assert self.stack is not None
        port = self.stack.start_protocol(**env)
        protocol = Protocol(port, self.stack.processes[-1])
        self.protocols.append(protocol)
        return protocol

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        assert self.stack is not None
        worker = self.stack.start_worker(**env)
        self.workers.append(worker)
        return worker

    def kill_protocol(self, protocol: Protocol, sig: int = signal.SIGKILL) -> None:
        self.protocols.remove(protocol)
        os.killpg(protocol.process.pid, sig)
        protocol.process.wait(30)

    def drain_protocol(self, protocol: Protocol, seconds: float = 10.0, grace: float = 30.0) -> float:
        """What Kubernetes does to a pod it removes: the preStop hook (`parley drain`), then SIGTERM,
        then SIGKILL after the grace period. Returns how long the process took to exit."""
        protocol.draining = True  # readiness says 503 at once: the Service stops routing to it
        started = time.monotonic()
        env = {**self.stack.env, "PORT": str(protocol.port)} if self.stack else {}
        subprocess.run([PARLEY, "drain", "--seconds", str(seconds)], env=env, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 20)
        os.killpg(protocol.process.pid, signal.SIGTERM)
        try:
            protocol.process.wait(max(1.0, grace - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            os.killpg(protocol.process.pid, signal.SIGKILL)
            protocol.process.wait()
            raise RuntimeError(f"protocol process on {protocol.port} outlived its grace period") from None
        finally:
            self.protocols.remove(protocol)
        return time.monotonic() - started

    def stop_worker(self, worker: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 30.0) -> float:
        self.workers.remove(worker)
        started = time.monotonic()
        os.killpg(worker.pid, sig)
        try:
            worker.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            raise RuntimeError("worker outlived its grace period") from None
        return time.monotonic() - started

    def pause_workers(self) -> None:
        """SIGSTOP every worker: the queue fills as if they were busy or stuck."""
        for worker in self.workers:
            os.killpg(worker.pid, signal.SIGSTOP)

    def resume_workers(self, workers: list[subprocess.Popen[bytes]] | None = None) -> None:
        for worker in self.workers if workers is None else workers:
            os.killpg(worker.pid, signal.SIGCONT)

    # Redis.

    def queue_length(self) -> int:
        """Entries in `chat.persist` right now, read from the server itself (not through a proxy)."""
        import redis

        from chat.contract import PERSIST_CHANNEL
        from parley.config import CONFIG

        client = redis.Redis(port=self.redis[self.persist_shard()].port)
        try:
            return int(client.zcard(CONFIG.channel_prefix + PERSIST_CHANNEL))
        finally:
            client.close()

    def restart_redis(self, shard: int, down_seconds: float = 0.0) -> None:
        """Stop the shard's server and start an empty one on the same port: every queue, key and
        subscription is lost, as after a Redis pod is rescheduled without persistence."""
        self.stop_redis(shard)
        time.sleep(down_seconds)
        self.start_redis(shard)

    def stop_redis(self, shard: int) -> None:
        self.redis[shard].stop()

    def start_redis(self, shard: int) -> None:
        """An empty server on the shard's port (stop() removed the old one's directory)."""
        server = self.redis[shard]
        server.workdir = tempfile.mkdtemp(prefix="parley-redis-")
        server.start()

    def pause_redis(self, shard: int) -> None:
        """SIGSTOP: the server holds its sockets open and answers nothing (a hung node)."""
        assert self.redis[shard].process is not None
        self.redis[shard].process.send_signal(signal.SIGSTOP)

    def resume_redis(self, shard: int) -> None:
        assert self.redis[shard].process is not None
        self.redis[shard].process.send_signal(signal.SIGCONT)
        wait_until_up(self.redis[shard].port)

    def shard_of(self, room: int) -> int:
        """The shard index that holds a room's topic (Parley's own rendezvous hash)."""
        sys.path.insert(0, str(REPO / "app"))
        from chat import contract
        from parley.sharding import shard_index

        urls = self.stack.env["REDIS_URLS"].split(",") if self.stack else []
        return shard_index(urls, contract.room_topic(room))

    def persist_shard(self) -> int:
        """The shard that holds `chat.persist` (every send goes there)."""
        from chat.contract import PERSIST_CHANNEL
        from parley.sharding import inbox_key, shard_index

        urls = self.stack.env["REDIS_URLS"].split(",") if self.stack else []
        return shard_index(urls, inbox_key(PERSIST_CHANNEL))
