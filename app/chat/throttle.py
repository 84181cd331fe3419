"""Throttles keyed by client address and account: WebSocket handshakes and logins.

- Handshakes: an in-process token bucket per client address (`HANDSHAKES`), checked before any
  database work. Per process is enough: the point is to bound what one address costs the one
  database thread of the process it reaches.
- Logins and registrations: fixed-window counters in Redis (`<prefix>:throttle:...`), so every
  protocol process shares them and an attacker gains nothing by spreading tries over pods.
  Redis down means no throttle (fail open, logged): logging in must not depend on a counter.

The client address is `scope["client"]` / `REMOTE_ADDR`, already resolved from trusted proxy
headers (`parley.proxies`). IPv6 addresses count per /64: one host usually holds a whole /64
and could otherwise take a fresh bucket per address.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import logging
import math
import time
from typing import Any

import redis

from chat.ratelimit import TokenBucket
from parley.config import CONFIG

log = logging.getLogger(__name__)

# Addresses tracked per process. A bucket is ~150 bytes, so this is ~1.5 MB at most; more
# distinct addresses than this within a few seconds means a distributed flood, which a
# per-address limit cannot stop anyway (a fresh bucket per address is what it gets either way).
HANDSHAKE_ADDRESSES_MAX = 10_000
# At most one log line per this many seconds about refused handshakes: a flood must not turn
# into a flood of logs.
REFUSAL_LOG_SECONDS = 10.0
# An address over its handshake rate is told why (socket accepted, `rate_limited`, close 4029)
# at most once per this many seconds; its other handshakes in that second are refused before
# the upgrade (HTTP 403), which costs the process about half as much: no accept, no frame, no
# close handshake. A client that reconnects in a loop still learns the reason every second; a
# handshake storm is answered at the cheapest price.
REFUSAL_EXPLAIN_SECONDS = 1.0
# Redis timeouts for the login counters (seconds): a login waits at most this for a sick Redis.
REDIS_TIMEOUT = 0.5
# After a Redis failure, the counters are skipped for this long instead of every login paying
# the timeout again.
REDIS_RETRY_SECONDS = 5.0


def address_key(host: str | None) -> str | None:
    """The throttle key of a client address: the address itself, or its /64 for IPv6."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Verdict(enum.Enum):
    """What a handshake gets from the per-address limit."""

    ADMIT = "admit"
    # Over the rate, told why: accepted, `error rate_limited`, close 4029.
    EXPLAIN = "explain"
    # Over the rate and told within the last REFUSAL_EXPLAIN_SECONDS: HTTP 403, no upgrade.
    REJECT = "reject"


class HandshakeLimiter:
    """A token bucket per client address, in a bounded dict."""

    def __init__(
        self,
        rate: float,
        burst: int,
        exempt: list[str],
        max_addresses: int = HANDSHAKE_ADDRESSES_MAX,
        clock: Any = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.exempt = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in exempt)
        self.max_addresses = max_addresses
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}
        # When each refused address was last told why (see REFUSAL_EXPLAIN_SECONDS); an entry
        # goes with its bucket's eviction, so this is bounded by max_addresses too.
        self.explained_at: dict[str, float] = {}
        self.refused = 0
        self.logged_at = -math.inf

    def _exempt(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.exempt)

    def _evict(self) -> None:
        """Make room: first every bucket that has refilled (no different from a new one), then,
        if that freed less than a quarter, the oldest. Amortised O(1) per new address."""
        now = self.clock()
        full = [k for k, b in self.buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for key in full:
            del self.buckets[key]
            self.explained_at.pop(key, None)
        target = self.max_addresses * 3 // 4
        while len(self.buckets) > target:
            key = next(iter(self.buckets))
            del self.buckets[key]
            self.explained_at.pop(key, None)

    def allow(self, host: str | None) -> bool:
        return self.check(host) is Verdict.ADMIT

    def check(self, host: str | None) -> Verdict:
        """Admit, refuse with the reason (4029), or refuse before the upgrade (HTTP 403)."""
        # No address: a Unix-socket listener, reachable only from the machine itself.
        if host is None or self.rate <= 0 or self._exempt(host):
            return Verdict.ADMIT
        key = address_key(host) or host
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_addresses:
                self._evict()
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
        if bucket.take():
            return Verdict.ADMIT
        self.refused += 1
        now = self.clock()
        if now - self.logged_at >= REFUSAL_LOG_SECONDS:
            log.warning("refused %d WebSocket handshakes over %.3g/s per address (latest from %s)",
                        self.refused, self.rate, key)
            self.refused, self.logged_at = 0, now
        if now - self.explained_at.get(key, -math.inf) >= REFUSAL_EXPLAIN_SECONDS:
            self.explained_at[key] = now
            return Verdict.EXPLAIN
        return Verdict.REJECT


HANDSHAKES = HandshakeLimiter(CONFIG.handshakes_per_second, CONFIG.handshake_burst, CONFIG.handshake_exempt)


# --- logins and registrations (Redis) ------------------------------------------------------------

_client: redis.Redis | None = None
_skip_until = 0.0


def _redis() -> redis.Redis | None:
    global _client
    if time.monotonic() < _skip_until:
        return None
    if _client is None:
        _client = redis.Redis.from_url(
            CONFIG.redis_urls[0], socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
        )
    return _client


def _redis_failed(exc: Exception) -> None:
    global _skip_until
    _skip_until = time.monotonic() + REDIS_RETRY_SECONDS
    log.warning("login throttle off for %.0fs: Redis unavailable (%s)", REDIS_RETRY_SECONDS, type(exc).__name__)


def _limits(kind: str) -> tuple[int, int]:
    """(per account, per address) for a kind of attempt; 0 means not counted."""
    if kind == "login":
        return CONFIG.login_failures_per_account, CONFIG.login_failures_per_address
    if kind == "register":
        return 0, CONFIG.register_per_address
    raise ValueError(f"unknown throttle kind {kind!r}")


def _keys(kind: str, account: str | None, address: str | None) -> list[tuple[str, int, str]]:
    """(Redis key, limit, what it counts, for logs) of each counter an attempt touches."""
    per_account, per_address = _limits(kind)
    keys = []
    if account and per_account > 0:
        # Hashed: a username is user input of any characters; the key stays short and plain.
        digest = hashlib.sha256(account.casefold().encode()).hexdigest()[:32]
        keys.append((CONFIG.key(f"throttle:{kind}:account:{digest}"), per_account, f"account {account[:150]!r}"))
    if (key := address_key(address)) and per_address > 0:
        keys.append((CONFIG.key(f"throttle:{kind}:address:{key}"), per_address, f"address {key}"))
    return keys


def blocked(kind: str, *, account: str | None = None, address: str | None = None) -> int | None:
    """Seconds until another attempt is allowed, or None if it is allowed now."""
    keys = _keys(kind, account, address)
    client = _redis()
    if not keys or client is None:
        return None
    try:
        pipe = client.pipeline(transaction=False)
        for key, _, _ in keys:
            pipe.get(key)
            pipe.ttl(key)
        answers = pipe.execute()
    except redis.RedisError as exc:
        _redis_failed(exc)
        return None
    wait = None
    for (_, limit, what), count, ttl in zip(keys, answers[::2], answers[1::2], strict=True):
        if count is not None and int(count) >= limit:
            wait = max(wait or 1, ttl if ttl and ttl > 0 else CONFIG.login_window_seconds)
            log.warning("throttled %s for %s (%d counted in %ds)", kind, what, int(count), CONFIG.login_window_seconds)
    return wait


def record(kind: str, *, account: str | None = None, address: str | None = None) -> None:
    """Count an attempt (a failed login, any registration) against the account and address."""
    keys = _keys(kind, account, address)
    client = _redis()
    if not keys or client is None:
        return
    try:
        pipe = client.pipeline(transaction=True)
        for key, _, _ in keys:
            # A fixed window that starts with the first attempt: SET NX starts it, INCR counts.
            pipe.set(key, 0, ex=CONFIG.login_window_seconds, nx=True)
            pipe.incr(key)
        pipe.execute()
    except redis.RedisError as exc:
        _redis_failed(exc)


def clear_account(kind: str, account: str) -> None:
    """Forget an account's failures after it logged in (the address's count stays)."""
    keys = [key for key, _, _ in _keys(kind, account, None)]
    client = _redis()
    if not keys or client is None:
        return
    try:
        client.delete(*keys)
    except redis.RedisError as exc:
        _redis_failed(exc)
