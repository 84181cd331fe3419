"""Every setting Parley reads from the environment, in one place.

Django settings, the channel layer, the fan-out bus and the management commands all read these
values; nothing else in the code base calls `os.environ`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def _redis_urls() -> list[str]:
    # REDIS_URLS lists the shards; REDIS_URL is the single-server shorthand.
    urls = _list("REDIS_URLS", "") or _list("REDIS_URL", "redis://127.0.0.1:6379/0")
    return urls


@dataclass(frozen=True)
class Config:
    debug: bool = field(default_factory=lambda: _bool("DEBUG", False))
    secret_key: str = field(
        default_factory=lambda: os.environ.get("SECRET_KEY", "insecure-dev-key-change-me-in-production")
    )
    allowed_hosts: list[str] = field(
        default_factory=lambda: _list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
    )
    # Browser (cookie) WebSockets must come from one of these origins; token clients need none.
    allowed_origins: list[str] = field(default_factory=lambda: _list("PARLEY_ALLOWED_ORIGINS", ""))
    database_url: str = field(
        default_factory=lambda: os.environ.get("DATABASE_URL", "sqlite:///var/parley.sqlite3")
    )
    # Seconds a worker or protocol thread keeps its database connection (0: close after use).
    db_conn_max_age: int = field(default_factory=lambda: _int("PARLEY_DB_CONN_MAX_AGE", 60))
    redis_urls: list[str] = field(default_factory=_redis_urls)
    # Connections per Redis shard per process. A BlockingConnectionPool waits for a free
    # connection instead of raising MaxConnectionsError (redis-py 8's default at 100).
    redis_pool_size: int = field(default_factory=lambda: _int("PARLEY_REDIS_POOL_SIZE", 200))
    redis_pool_timeout: float = field(default_factory=lambda: _float("PARLEY_REDIS_POOL_TIMEOUT", 5.0))
    channel_prefix: str = field(default_factory=lambda: os.environ.get("PARLEY_CHANNEL_PREFIX", "asgi"))
    channel_expiry: int = field(default_factory=lambda: _int("PARLEY_CHANNEL_EXPIRY", 60))
    # Capacity of each worker channel (messages waiting); beyond it senders get `busy`.
    worker_channel_capacity: int = field(default_factory=lambda: _int("PARLEY_WORKER_CAPACITY", 10000))
    # Capacity of a protocol process inbox (acks and errors from workers).
    inbox_capacity: int = field(default_factory=lambda: _int("PARLEY_INBOX_CAPACITY", 10000))
    open_registration: bool = field(default_factory=lambda: _bool("PARLEY_OPEN_REGISTRATION", False))
    max_body_bytes: int = field(default_factory=lambda: _int("PARLEY_MAX_BODY_BYTES", 4096))
    rate_per_second: float = field(default_factory=lambda: _float("PARLEY_RATE_PER_SECOND", 20.0))
    rate_burst: int = field(default_factory=lambda: _int("PARLEY_RATE_BURST", 40))
    # Frames a connection may have queued for writing before it is closed as too slow (4008).
    send_buffer_frames: int = field(default_factory=lambda: _int("PARLEY_SEND_BUFFER", 1000))
    # `resume` replays at most this many messages per room; beyond that the client must reload.
    resume_max: int = field(default_factory=lambda: _int("PARLEY_RESUME_MAX", 500))
    history_max: int = field(default_factory=lambda: _int("PARLEY_HISTORY_MAX", 200))
    batch_max: int = field(default_factory=lambda: _int("PARLEY_BATCH_MAX", 200))
    # A batch of one costs ~4 ms of CPU (eight statements), a batch of 200 ~18 ms. Under load
    # batches fill by themselves (everything waiting is taken at once); 15 ms here cost more
    # p99 than it saved CPU in `make bench`, so the wait stays short.
    batch_wait_ms: float = field(default_factory=lambda: _float("PARLEY_BATCH_WAIT_MS", 5.0))
    drain_seconds: float = field(default_factory=lambda: _float("PARLEY_DRAIN_SECONDS", 30.0))
    # The jittered reconnect delay told to clients when a protocol process drains.
    reconnect_jitter_ms: int = field(default_factory=lambda: _int("PARLEY_RECONNECT_JITTER_MS", 5000))
    port: int = field(default_factory=lambda: _int("PORT", 8000))
    metrics_port: int = field(default_factory=lambda: _int("PARLEY_METRICS_PORT", 9100))
    pod_name: str = field(default_factory=lambda: os.environ.get("POD_NAME", socket.gethostname()))
    heartbeat_seconds: float = field(default_factory=lambda: _float("PARLEY_HEARTBEAT_SECONDS", 5.0))
    heartbeat_ttl: int = field(default_factory=lambda: _int("PARLEY_HEARTBEAT_TTL", 15))
    log_level: str = field(default_factory=lambda: os.environ.get("PARLEY_LOG_LEVEL", "INFO"))

    @property
    def origins(self) -> list[str]:
        """Allowed browser origins: explicit list, else every allowed host on http and https."""
        if self.allowed_origins:
            return self.allowed_origins
        return [h for h in self.allowed_hosts]


def load() -> Config:
    return Config()


CONFIG = load()
