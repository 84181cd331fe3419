"""Read the load signals from the channel-layer Redis shards.

Two signals, both read straight from Redis rather than scraped from pods, so the operator
needs no network path to the pods and sees the same numbers on every poll:

* Worker backlog. channels-redis stores named channel X as the sorted set `<prefix>X`, scored
  by enqueue time; a receiver pops a message into `<prefix>X$inflight` and removes it from
  there once the receive has returned (a receiver killed in between leaves it there, and the
  next receive puts it back on the queue), so in-flight entries are work still to be done.
  Entries older than the layer's expiry are dead (dropped at the next send, never delivered),
  yet ZCARD still counts them, so we ZCOUNT only scores newer than `now - expiry`, exactly the
  cut-off channels-redis applies. Which shard holds a channel is the app's business: we sum
  every shard.
* Per-process heartbeats `<prefix>:proc:<id>` (role, pod, connections, inbox, held, draining,
  ts), where `<prefix>` is the platform's PARLEY_CHANNEL_PREFIX, so two platforms on one Redis
  never count each other's processes. Each shard keeps a registry of its live processes, the
  sorted set `<prefix>:procs` scored by when each member's heartbeat expires: a poll reads the
  members still live (no SCAN of the keyspace) and the hash of each. A process that died leaves
  its hash (until its TTL) behind; only hashes whose `ts` is fresh are trusted, and only those
  of processes that are not draining count as load. Several processes may share a pod, so
  values are summed per pod. A malformed hash (a count that is not a small non-negative
  integer, a `pod` that is not the process's own) is rejected and logged; it never fails the poll.

A shard that fails is reported in the Snapshot (`failed_shards`), and the reading is then a
lower bound (`partial`): enough to scale up (waking workers from zero included), never to scale
down. Only when every shard fails is the reading unavailable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

log = logging.getLogger(__name__)

HEARTBEAT_FRESH_SECONDS = 15.0
CLOCK_SKEW_SECONDS = 5.0  # a heartbeat slightly "from the future" is a skewed clock, not garbage
# Far above what one process holds (~10k sockets measured): a larger count is garbage, and taken
# as is it would overflow the status' int64 fields or scale the tier to its maximum.
MAX_HEARTBEAT_COUNT = 10_000_000
HOSTNAME_MAX = 63  # a pod's hostname is its name cut to 63 characters
_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PROCESS_ID = re.compile(r"^(.+)-[0-9]+-[0-9a-f]+$")  # <hostname>-<pid>-<random hex>
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def heartbeat_prefix(prefix: str) -> str:
    """`<prefix>:proc:`, the start of every heartbeat key of a platform (see app/chat/process.py)."""
    return f"{prefix}:proc:"


def registry_key(prefix: str) -> str:
    """`<prefix>:procs`: on each shard, the processes whose heartbeat lives there, scored by the
    time (epoch seconds) the heartbeat expires (see app/chat/contract.py)."""
    return f"{prefix}:procs"


def heartbeat_pattern(prefix: str) -> str:
    """The SCAN MATCH pattern of a platform's heartbeats, glob characters of the prefix escaped."""
    return _GLOB_SPECIAL.sub(r"\\\1", heartbeat_prefix(prefix)) + "*"


class MetricsUnavailable(Exception):
    """Redis could not be read at all; the message says which shards and why."""


@dataclass(frozen=True)
class Heartbeat:
    process_id: str
    role: str
    pod: str
    connections: int
    inbox: int
    draining: bool
    ts: float
    held: int = 0  # messages a worker took from Redis and has not stored yet (invisible in Redis)


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    queue_depth: Mapping[str, int]  # live messages per channel, all shards
    in_flight: Mapping[str, int]  # messages being handled per channel, all shards
    heartbeats: Sequence[Heartbeat] = ()  # fresh ones only
    stale_heartbeats: int = 0
    shards: int = 1
    rejected_heartbeats: int = 0  # malformed hashes, ignored (and logged)
    failed_shards: tuple[str, ...] = ()  # "<redacted url>: <error>" of each shard not read
    oldest_queued: float | None = None  # enqueue time of the oldest live queued message, if any
    unlisted_heartbeats: int = 0  # fresh heartbeats of pods that are gone or terminating

    @property
    def partial(self) -> bool:
        """Some shards were not read: every sum is a lower bound."""
        return bool(self.failed_shards)

    @property
    def serving(self) -> tuple[Heartbeat, ...]:
        """The heartbeats that count as load: a draining process's clients are reconnecting
        elsewhere, where they are counted again."""
        return tuple(hb for hb in self.heartbeats if not hb.draining)

    @property
    def oldest_wait(self) -> float:
        """Seconds the oldest live queued message has waited (0 with an empty queue)."""
        return 0.0 if self.oldest_queued is None else max(0.0, self.taken_at - self.oldest_queued)

    @property
    def total_queue_depth(self) -> int:
        return sum(self.queue_depth.values())

    @property
    def worker_held(self) -> int:
        """Messages taken by workers and not stored yet: out of Redis, still work."""
        return sum(hb.held for hb in self.serving if hb.role == "worker")

    @property
    def worker_load(self) -> int:
        # Popped-but-unacknowledged (or stranded) messages will be delivered again: still work.
        return self.total_queue_depth + sum(self.in_flight.values()) + self.worker_held

    def _per_pod(self, role: str, attr: str) -> dict[str, int]:
        per_pod: dict[str, int] = defaultdict(int)
        for hb in self.serving:
            if hb.role == role:
                per_pod[hb.pod] += getattr(hb, attr)
        return dict(per_pod)

    @property
    def pod_connections(self) -> dict[str, int]:
        return self._per_pod("protocol", "connections")

    @property
    def protocol_reporting(self) -> bool:
        return any(hb.role == "protocol" for hb in self.serving)

    def only_pods(self, pods: Mapping[str, Iterable[str]]) -> Snapshot:
        """This snapshot without the heartbeats of pods not in `pods[role]` (the pods that exist
        and are not terminating): a deleted or evicted pod's last heartbeat stays fresh for a
        while after its clients have reconnected elsewhere, and would count them twice."""
        listed = {role: set(names) for role, names in pods.items()}
        kept = tuple(hb for hb in self.heartbeats if hb.pod in listed.get(hb.role, ()))
        return dataclasses.replace(
            self, heartbeats=kept,
            unlisted_heartbeats=self.unlisted_heartbeats + len(self.heartbeats) - len(kept))

    @property
    def connections(self) -> int:
        return sum(self.pod_connections.values())

    @property
    def draining_pods(self) -> set[str]:
        return {hb.pod for hb in self.heartbeats if hb.draining}

    @property
    def inbox_backlog(self) -> dict[str, int]:
        """The heartbeats' `inbox` per pod: frames waiting to be written to a protocol pod's clients."""
        return self._per_pod("worker", "inbox") | {
            pod: n for pod, n in self._per_pod("protocol", "inbox").items() if n
        }


def redact(url: str) -> str:
    """A URL fit for status and logs: the password never leaves the operator."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    else:
        netloc = f":***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class BadHeartbeat(ValueError):
    """A heartbeat hash that cannot be trusted; the message says which field and why."""


def _count(fields: Mapping[str, str], name: str) -> int:
    raw = fields.get(name, "0")
    try:
        value = float(raw)
    except ValueError:
        raise BadHeartbeat(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value != int(value) or not 0 <= value <= MAX_HEARTBEAT_COUNT:
        raise BadHeartbeat(f"{name}={raw!r} is not a count between 0 and {MAX_HEARTBEAT_COUNT}")
    return int(value)


def check_heartbeat(process_id: str, fields: Mapping[bytes | str, bytes | str]) -> Heartbeat:
    """A heartbeat hash as typed data; BadHeartbeat if any field is malformed.

    The process id is `<hostname>-<pid>-<random>` (app/chat/process.py) and a pod's hostname is
    its name (cut to 63 characters), so a `pod` that does not start the id is a hash claiming
    another pod's load: it would move connections (and pod-deletion-cost) between pods.
    """
    try:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
    except UnicodeDecodeError:
        raise BadHeartbeat("fields are not UTF-8") from None
    if "ts" not in f:
        raise BadHeartbeat("no ts")
    try:
        ts = float(f["ts"])
    except ValueError:
        raise BadHeartbeat(f"ts={f['ts']!r} is not a number") from None
    if not math.isfinite(ts):
        raise BadHeartbeat(f"ts={f['ts']!r} is not finite")
    pod = f.get("pod") or process_id
    if pod != process_id:
        if not _POD_NAME.match(pod):
            raise BadHeartbeat(f"pod={pod[:80]!r} is not a pod name")
        host = pod[:HOSTNAME_MAX]
        m = _PROCESS_ID.match(process_id)
        if (m.group(1) != host) if m else not process_id.startswith(host + "-"):
            raise BadHeartbeat(f"pod={pod!r} is not the pod of process {process_id!r}")
    return Heartbeat(
        process_id=process_id,
        role=f.get("role", ""),
        pod=pod,
        connections=_count(f, "connections"),
        inbox=_count(f, "inbox"),
        draining=f.get("draining", "0") in ("1", "true", "True"),
        ts=ts,
        held=_count(f, "held"),
    )


def parse_heartbeat(process_id: str, fields: Mapping[bytes | str, bytes | str]) -> Heartbeat | None:
    """A heartbeat hash as typed data, or None if it is malformed (skipped and logged, never a crash)."""
    try:
        return check_heartbeat(process_id, fields)
    except BadHeartbeat as exc:
        log.warning("ignoring malformed heartbeat of process %r: %s", process_id[:120], exc)
        return None


class RedisMetrics:
    """Reads a Snapshot from every shard. One instance per ChatPlatform; reuse it across polls."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        prefix: str = "asgi",
        expiry_seconds: float = 60.0,
        fresh_seconds: float = HEARTBEAT_FRESH_SECONDS,
        timeout: float = 2.0,
    ) -> None:
        self.urls = tuple(urls)
        self.prefix = prefix
        self.expiry_seconds = expiry_seconds
        self.fresh_seconds = fresh_seconds
        self.timeout = timeout
        # No client-side retries: a down shard must be reported within one poll, not after a
        # backoff ladder; the next poll is the retry.
        self._clients = [
            aioredis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=30,
            )
            for url in self.urls
        ]

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def read(self, channels: Iterable[str], now: float | None = None) -> Snapshot:
        """Read every shard. Freshness is judged by the clock after the reads (or `now`), so a
        heartbeat written while a slow shard answered does not look "from the future"."""
        channels = tuple(channels)
        started = time.time() if now is None else now
        reads = (self._read_shard(client, channels, started) for client in self._clients)
        results = await asyncio.gather(*reads, return_exceptions=True)
        now = time.time() if now is None else now
        queue: dict[str, int] = dict.fromkeys(channels, 0)
        inflight: dict[str, int] = dict.fromkeys(channels, 0)
        fresh: list[Heartbeat] = []
        failed: list[str] = []
        oldest: float | None = None
        stale = rejected = 0
        for url, result in zip(self.urls, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, (RedisError, OSError, TimeoutError)):
                    raise result
                failed.append(f"Redis shard {redact(url)}: {type(result).__name__}: {result}")
                continue
            shard_queue, shard_inflight, beats, bad, shard_oldest = result
            rejected += bad
            if shard_oldest is not None:
                oldest = shard_oldest if oldest is None else min(oldest, shard_oldest)
            for ch in channels:
                queue[ch] += shard_queue[ch]
                inflight[ch] += shard_inflight[ch]
            for hb in beats:
                if now - self.fresh_seconds < hb.ts <= now + CLOCK_SKEW_SECONDS:
                    fresh.append(hb)
                else:
                    stale += 1
        if len(failed) == len(self.urls):
            raise MetricsUnavailable("; ".join(failed))
        return Snapshot(now, queue, inflight, tuple(fresh), stale, len(self.urls), rejected, tuple(failed),
                        oldest_queued=oldest)

    async def _heartbeat_keys(self, client: aioredis.Redis, now: float) -> list[bytes | str]:
        """The heartbeat keys of the processes registered live on this shard.

        Members whose score (their heartbeat's expiry) has passed are dead processes that never
        removed themselves (killed): skipped here, pruned by the next live process's heartbeat.
        An empty registry means processes of an app older than the registry: SCAN for them.
        """
        registry = registry_key(self.prefix)
        members = await client.zrangebyscore(registry, f"({now - CLOCK_SKEW_SECONDS}", "+inf")
        start = heartbeat_prefix(self.prefix)
        if members or await client.exists(registry):
            return [start + (m.decode(errors="replace") if isinstance(m, bytes) else m) for m in members]
        return [k async for k in client.scan_iter(match=heartbeat_pattern(self.prefix), count=1000)]

    async def _read_shard(
        self, client: aioredis.Redis, channels: Sequence[str], now: float,
    ) -> tuple[dict[str, int], dict[str, int], list[Heartbeat], int, float | None]:
        async with asyncio.timeout(self.timeout * 2):
            # channels-redis drops scores <= int(now) - expiry; count strictly newer ones.
            cutoff = f"({int(now) - int(self.expiry_seconds)}"
            pipe = client.pipeline(transaction=False)
            for ch in channels:
                key = self.prefix + ch
                pipe.zcount(key, cutoff, "+inf")
                pipe.zcount(key + "$inflight", cutoff, "+inf")
                # The oldest live message: how long work has waited (waking below the threshold).
                pipe.zrangebyscore(key, cutoff, "+inf", start=0, num=1, withscores=True)
            counts = await pipe.execute()
            queue = {ch: int(counts[3 * i]) for i, ch in enumerate(channels)}
            inflight = {ch: int(counts[3 * i + 1]) for i, ch in enumerate(channels)}
            firsts = [float(counts[3 * i + 2][0][1]) for i in range(len(channels)) if counts[3 * i + 2]]
            oldest = min(firsts, default=None)

            start = heartbeat_prefix(self.prefix)
            keys = await self._heartbeat_keys(client, now)
            beats: list[Heartbeat] = []
            rejected = 0
            if keys:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.hgetall(key)
                # raise_on_error=False: a key of another type under the pattern (WRONGTYPE) is
                # one bad heartbeat, not an unreadable shard.
                for key, fields in zip(keys, await pipe.execute(raise_on_error=False), strict=True):
                    name = key.decode(errors="replace") if isinstance(key, bytes) else key
                    if isinstance(fields, Exception):
                        if not isinstance(fields, ResponseError):
                            raise fields
                        log.warning("ignoring heartbeat key %r: %s", name[:120], fields)
                        rejected += 1
                        continue
                    if not fields:
                        continue  # registered, but its hash expired or was deleted: gone
                    hb = parse_heartbeat(name.removeprefix(start), fields)
                    if hb is None:
                        rejected += 1
                    else:
                        beats.append(hb)
            return queue, inflight, beats, rejected, oldest
