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


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (os.environ.get(name) or default).strip().lower()
    if raw not in choices:
        raise SystemExit(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


DEV_SECRET_KEY = "insecure-dev-key-change-me-in-production"


def _redis_urls() -> list[str]:
    # REDIS_URLS lists the shards; REDIS_URL is the single-server shorthand.
    urls = _list("REDIS_URLS", "") or _list("REDIS_URL", "redis://127.0.0.1:6379/0")
    return urls


def default_admin_socket(port: int) -> str:
    # Per port: several protocol processes of one machine (tests, `make run`) do not collide.
    # /tmp is the emptyDir of a pod with a read-only root filesystem.
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), f"parley-admin-{port}.sock")


@dataclass(frozen=True)
class Config:
    debug: bool = field(default_factory=lambda: _bool("DEBUG", False))
    secret_key: str = field(default_factory=lambda: os.environ.get("SECRET_KEY", DEV_SECRET_KEY))
    # The local run (`make run`, the test runner) may sign with the built-in key; nothing else may:
    # anyone who reads this file could forge session cookies and CSRF tokens.
    dev: bool = field(default_factory=lambda: _bool("PARLEY_DEV", False))
    allowed_hosts: list[str] = field(
        default_factory=lambda: _list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
    )
    # Browser (cookie) WebSockets must come from one of these origins; token clients need none.
    allowed_origins: list[str] = field(default_factory=lambda: _list("PARLEY_ALLOWED_ORIGINS", ""))
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (the ingress controller's pod
    # range). Empty: none, the TCP peer is the client. Any other peer could claim any address.
    trusted_proxies: list[str] = field(default_factory=lambda: _list("PARLEY_TRUSTED_PROXIES", ""))
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
    # How long a Redis shard may leave a command, or the room bus's PINGs, unanswered before the
    # connection counts as dead and is replaced. Parley's commands take microseconds and its
    # blocking receives wait at most 2 s, so 6 s is a hung or half-open connection (a paused
    # server, a dropped NAT entry), not a slow answer; the fault suite's redis_network case times
    # how fast Parley recovers from black-holed connections with it (docs/reliability.md).
    redis_timeout: float = field(default_factory=lambda: _float("PARLEY_REDIS_TIMEOUT", 6.0))
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
    # ...and characters of text queued (frames differ 1,000-fold in size: a `history` page can be
    # hundreds of KB). 4 MiB per socket: 100 stalled clients cost at most ~400 MB.
    send_buffer_bytes: int = field(default_factory=lambda: _int("PARLEY_SEND_BUFFER_BYTES", 4 << 20))
    # The largest frame the server writes. Daphne's and uvicorn's libraries refuse (or choke on)
    # multi-MB frames; history pages are split below this and say so in `has_more`.
    max_frame_bytes: int = field(default_factory=lambda: _int("PARLEY_MAX_FRAME_BYTES", 512 << 10))
    # The largest client frame the servers read (close 1009 beyond). The protocol's own limit is
    # a 4 KiB body escaped as \uXXXX (6x) plus the envelope, or a 500-room `resume` (~22 KB).
    ws_max_bytes: int = field(default_factory=lambda: _int("PARLEY_WS_MAX_SIZE", 64 << 10))
    # Client frames waiting for the consumer before the server stops reading the socket. A
    # client's frames are handled one at a time; 64 is far above any honest burst (rate_burst).
    inbox_frames: int = field(default_factory=lambda: _int("PARLEY_INBOX_FRAMES", 64))
    # Sockets one user may hold on one protocol process (4009 beyond): a few devices and tabs.
    max_sockets_per_user: int = field(default_factory=lambda: _int("PARLEY_MAX_SOCKETS_PER_USER", 20))
    # Rooms one connection may be joined to (`too_many_rooms` beyond): as many as `resume` takes.
    max_rooms_per_connection: int = field(default_factory=lambda: _int("PARLEY_MAX_ROOMS_PER_CONNECTION", 500))
    # Database catch-ups one connection may run at once; the rest queue. Each holds the process's
    # database thread for a query, so one socket must not take it away from everyone else.
    catchups_per_connection: int = field(default_factory=lambda: _int("PARLEY_CATCHUPS_PER_CONNECTION", 2))
    # `typing` frames are fanned out at most once per this many seconds per connection and room
    # (a client types continuously; everyone else's sockets pay for each one).
    typing_interval: float = field(default_factory=lambda: _float("PARLEY_TYPING_INTERVAL", 1.0))
    # `read` markers likewise: one fan-out per room per connection per this many seconds.
    read_interval: float = field(default_factory=lambda: _float("PARLEY_READ_INTERVAL", 0.5))
    # `resume` replays at most this many messages per room; beyond that the client must reload.
    resume_max: int = field(default_factory=lambda: _int("PARLEY_RESUME_MAX", 500))
    history_max: int = field(default_factory=lambda: _int("PARLEY_HISTORY_MAX", 200))
    batch_max: int = field(default_factory=lambda: _int("PARLEY_BATCH_MAX", 200))
    # The shortest interval between two receives of a worker whose batches are not full: what
    # arrives meanwhile is stored as one batch. A batch costs the same few statements and
    # round trips whatever its size (~3 ms of the worker's CPU), so at 1,000 messages/s one
    # batch per message would take the whole core; at 20 ms they are ~20 messages each, for
    # at most 20 ms more latency. A message after a quiet spell is taken at once, and a full
    # batch waiting is taken without a pause (docs/benchmarks.md, "Worker throughput").
    batch_wait_ms: float = field(default_factory=lambda: _float("PARLEY_BATCH_WAIT_MS", 20.0))
    # Batches one worker process stores at once on PostgreSQL (`chat.store_pg`), each on a
    # connection of its own, a room in at most one of them (`chat.batcher`). While one batch
    # waits on the database the next is planned and sent: 4 kept the worker's core busy on a
    # local database (docs/benchmarks.md, "Worker throughput") and costs the database 4
    # connections per worker process. At a trickle only one is used. SQLite always uses one.
    store_connections: int = field(default_factory=lambda: max(1, _int("PARLEY_STORE_CONNECTIONS", 4)))
    # `auto`: on PostgreSQL, the worker stores (`chat.store_pg`) and the protocol processes read
    # (`chat.reads_pg`) with async psycopg on their own loops; the ORM elsewhere. `orm`: the ORM
    # path everywhere (the path before issue 11: a fallback, and the benchmarks' comparison).
    store: str = field(default_factory=lambda: _choice("PARLEY_STORE", "auto", ("auto", "orm")))
    # Connections each protocol process reads through on PostgreSQL (token lookups, joins,
    # catch-ups; `chat.reads_pg`). Each kind of read has one statement in flight at a time
    # (`chat.reads_pg.LANES`) carrying every socket's questions, and there are five kinds: 4
    # connections rarely leave one waiting. The database's budget is this times the protocol
    # processes, plus PARLEY_STORE_CONNECTIONS times the workers.
    protocol_db_connections: int = field(default_factory=lambda: max(1, _int("PARLEY_PROTOCOL_DB_CONNECTIONS", 4)))
    # Presence in crowded rooms. Each arrival is a frame to every member online, so a room's
    # reconnect storm costs members² frames: 400 for a room of 20, 4 million for a live event
    # of 2,000 (whose `joined` frames, listing everyone, also passed 64 KiB: make bench's big
    # room, docs/benchmarks.md). In a room with at least this many users online,
    # arrivals and departures are not announced, and `joined` lists this many of them with
    # `online_count` for the rest. 100 keeps every team room's presence live.
    presence_max: int = field(default_factory=lambda: max(1, _int("PARLEY_PRESENCE_MAX", 100)))
    # A user's last connection in a room left: announce `offline` this much later, unless the
    # user is back by then (on any process). Longer than the heartbeat (another process must
    # have refreshed a returning user's entry to be told apart) and than the drain's reconnect
    # jitter (a drained pod's users come back unannounced); shorter than the presence TTL.
    presence_grace_seconds: float = field(default_factory=lambda: _float("PARLEY_PRESENCE_GRACE_SECONDS", 10.0))
    # Presence changes of a room are gathered this long and announced in one frame per status
    # (`users` lists them all): a room's first joins (20 members at ~650 joins/s arrive within
    # ~30 ms) cost each member one frame instead of one per arrival, 20 frames instead of 210 for
    # a room of 20. A human does not see 100 ms on an online dot.
    presence_batch_seconds: float = field(
        default_factory=lambda: max(0.0, _float("PARLEY_PRESENCE_BATCH_MS", 100.0) / 1000))
    drain_seconds: float = field(default_factory=lambda: _float("PARLEY_DRAIN_SECONDS", 30.0))
    # The jittered reconnect delay told to clients when a protocol process drains.
    reconnect_jitter_ms: int = field(default_factory=lambda: _int("PARLEY_RECONNECT_JITTER_MS", 5000))
    port: int = field(default_factory=lambda: _int("PORT", 8000))
    # Prometheus metrics of protocol and worker processes, on a port of their own (never the
    # public listener). 0: off.
    metrics_port: int = field(default_factory=lambda: _int("PARLEY_METRICS_PORT", 9100))
    # The protocol process's admin listener (drain, status): a Unix socket, so only processes of
    # the same pod (the preStop hook) reach it, whatever a request through the ingress claims.
    admin_socket: str = field(
        default_factory=lambda: os.environ.get("PARLEY_ADMIN_SOCKET") or default_admin_socket(_int("PORT", 8000))
    )
    # --- tokens and credentials (chat.tokens, chat.throttle; docs/security.md, "Tokens and credentials") ---
    # Days an API token lives. A month: programs re-login rarely, a leaked token dies on its own.
    token_ttl_days: int = field(default_factory=lambda: _int("PARLEY_TOKEN_TTL_DAYS", 30))
    # Live tokens one user may hold (the oldest is dropped beyond): a few per device and
    # program, and a login loop no longer grows the table without bound.
    max_tokens_per_user: int = field(default_factory=lambda: _int("PARLEY_MAX_TOKENS_PER_USER", 20))
    # Seconds a token lookup (found or not) is remembered per process. Revocation is immediate
    # in the process that revokes; elsewhere it takes effect within this bound (and live sockets
    # are closed at once over the control topic). Short: a bound on stale answers, long enough
    # that a handshake storm repeating a token costs one query.
    token_cache_seconds: float = field(default_factory=lambda: _float("PARLEY_TOKEN_CACHE_SECONDS", 5.0))
    # WebSocket handshakes per client address (token bucket; 4029 beyond). 10/s sustained is far
    # above any honest address; the burst of 50 lets a NAT'd office reconnect after a drain.
    handshakes_per_second: float = field(default_factory=lambda: _float("PARLEY_HANDSHAKES_PER_SECOND", 10.0))
    handshake_burst: int = field(default_factory=lambda: _int("PARLEY_HANDSHAKE_BURST", 50))
    # Peers the handshake limit does not apply to: same-host peers (the local run, tests, the
    # benchmark, sidecars) are never a remote attacker; proxy headers cannot claim them.
    handshake_exempt: list[str] = field(
        default_factory=lambda: _list("PARLEY_HANDSHAKE_EXEMPT", "127.0.0.0/8,::1/128")
    )
    # Login throttle window (seconds) and what it allows, shared by every process through Redis.
    # Five minutes: long enough to make guessing slow (10 tries per 5 min is ~3,000 a day per
    # account), short enough that someone locked out by an attacker's failures waits little.
    login_window_seconds: int = field(default_factory=lambda: _int("PARLEY_LOGIN_WINDOW_SECONDS", 300))
    # Failed logins per account per window (429 beyond): more than any person mistyping.
    login_failures_per_account: int = field(default_factory=lambda: _int("PARLEY_LOGIN_FAILURES_PER_ACCOUNT", 10))
    # Failed logins per client address per window: higher, as a NAT or proxy hides many people.
    login_failures_per_address: int = field(default_factory=lambda: _int("PARLEY_LOGIN_FAILURES_PER_ADDRESS", 50))
    # Registrations (attempts) per client address per window: a class signing up together fits.
    register_per_address: int = field(default_factory=lambda: _int("PARLEY_REGISTER_PER_ADDRESS", 20))
    pod_name: str = field(default_factory=lambda: os.environ.get("POD_NAME", socket.gethostname()))
    heartbeat_seconds: float = field(default_factory=lambda: _float("PARLEY_HEARTBEAT_SECONDS", 5.0))
    heartbeat_ttl: int = field(default_factory=lambda: _int("PARLEY_HEARTBEAT_TTL", 15))
    log_level: str = field(default_factory=lambda: os.environ.get("PARLEY_LOG_LEVEL", "INFO"))

    @property
    def origins(self) -> list[str]:
        """Allowed browser origins: the explicit list, else each named host of ALLOWED_HOSTS
        (as Channels' OriginValidator reads a bare host: that host, any scheme and port;
        `.example.com`: it and its subdomains).

        A wildcard host never becomes an origin: with `*` (what a pod behind an ingress often
        needs for probes) any site could open a socket with the user's cookie.
        """
        if self.allowed_origins:
            return self.allowed_origins
        return [h for h in self.allowed_hosts if h and "*" not in h]

    def key(self, name: str) -> str:
        """A Redis key or topic of this platform: every key is namespaced by the channel prefix,
        so two platforms sharing a Redis never see each other's rooms or processes."""
        return f"{self.channel_prefix}:{name}"

    def check_secret_key(self) -> None:
        if self.secret_key == DEV_SECRET_KEY and not self.dev:
            raise SystemExit(
                "SECRET_KEY is not set: refusing to start with the built-in development key. "
                "Set SECRET_KEY (a long random string), or PARLEY_DEV=1 for a local run."
            )


def load() -> Config:
    return Config()


CONFIG = load()
