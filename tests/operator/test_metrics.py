"""The Redis reader against real Redis servers, fed by the real channels-redis layer."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from channels_redis.core import RedisChannelLayer

from embedded_redis import EmbeddedRedis, free_port
from parley_operator.metrics import (
    BadHeartbeat,
    Heartbeat,
    MetricsUnavailable,
    RedisMetrics,
    Snapshot,
    check_heartbeat,
    parse_heartbeat,
    redact,
    registry_key,
)

CHANNELS = ("chat.persist", "chat.bot")


@pytest.fixture(scope="module")
def shards() -> Iterator[list[EmbeddedRedis]]:
    servers = [EmbeddedRedis().start(), EmbeddedRedis().start()]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def urls(shards: list[EmbeddedRedis]) -> list[str]:
    for server in shards:
        redis.Redis.from_url(server.url).flushall()
    return [server.url for server in shards]


async def read(urls: list[str], **kwargs: float) -> object:
    reader = RedisMetrics(urls, **kwargs)
    try:
        return await reader.read(CHANNELS)
    finally:
        await reader.close()


async def test_counts_what_channels_redis_enqueued_across_shards(urls: list[str]) -> None:
    layer = RedisChannelLayer(hosts=urls, prefix="asgi", capacity=1000)
    for i in range(7):
        await layer.send("chat.persist", {"type": "chat.persist", "n": i})
    for i in range(3):
        await layer.send("chat.bot", {"type": "chat.bot", "n": i})
    await layer.close_pools()
    # The app may spread a named channel over shards (Parley's layer does): put some on the other.
    for url in urls:
        redis.Redis.from_url(url).zadd("asgichat.persist", {f"extra-{url}": time.time()})

    snapshot = await read(urls)
    assert snapshot.queue_depth == {"chat.persist": 9, "chat.bot": 3}
    assert snapshot.total_queue_depth == 12
    assert snapshot.worker_load == 12
    assert snapshot.shards == 2


async def test_expired_entries_are_not_work(urls: list[str]) -> None:
    client = redis.Redis.from_url(urls[1])
    now = time.time()
    client.zadd("asgichat.persist", {f"dead-{i}": now - 61 for i in range(100)})  # past the 60 s expiry
    client.zadd("asgichat.persist", {f"live-{i}": now - 30 for i in range(5)})
    assert client.zcard("asgichat.persist") == 105  # what a naive ZCARD-based scaler would see

    snapshot = await read(urls)
    assert snapshot.queue_depth["chat.persist"] == 5
    assert (await read(urls, expiry_seconds=120)).queue_depth["chat.persist"] == 105


async def test_in_flight_messages_keep_a_worker_busy(urls: list[str]) -> None:
    redis.Redis.from_url(urls[0]).zadd("asgichat.bot$inflight", {"being-handled": time.time()})
    snapshot = await read(urls)
    assert snapshot.total_queue_depth == 0
    assert snapshot.in_flight == {"chat.persist": 0, "chat.bot": 1}
    assert snapshot.worker_load == 1


async def test_only_fresh_heartbeats_count_summed_per_pod(urls: list[str]) -> None:
    now = time.time()

    def beat(url: str, pid: str, **fields: object) -> None:
        redis.Redis.from_url(url).hset(f"asgi:proc:{fields['pod']}-{pid}", mapping={
            "role": "protocol", "connections": 0, "inbox": 0, "draining": 0, "ts": now, **fields})

    # Heartbeats land on whichever shard; processes of one pod are summed.
    beat(urls[0], "a1", pod="web-a", connections=120)
    beat(urls[1], "a2", pod="web-a", connections=30)
    beat(urls[1], "b1", pod="web-b", connections=40, draining=1)
    beat(urls[0], "ghost", pod="web-c", connections=5000, ts=now - 16)  # died 16 s ago
    beat(urls[0], "w1", pod="worker-a", role="worker", inbox=3)
    redis.Redis.from_url(urls[0]).hset("asgi:proc:broken", mapping={"role": "protocol"})  # no ts

    snapshot = await read(urls)
    # web-b drains: its clients are reconnecting to the others, where they are counted.
    assert snapshot.pod_connections == {"web-a": 150}
    assert snapshot.connections == 150
    assert snapshot.draining_pods == {"web-b"}
    assert snapshot.stale_heartbeats == 1
    assert snapshot.protocol_reporting
    assert snapshot.inbox_backlog == {"worker-a": 3}


async def test_a_dead_shard_leaves_a_lower_bound_and_says_which(urls: list[str]) -> None:
    redis.Redis.from_url(urls[0]).zadd("asgichat.persist", {"m1": time.time(), "m2": time.time()})
    dead = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    snapshot = await read([*urls, dead], timeout=0.5)
    assert time.monotonic() - started < 3  # reported within a poll, not after a retry ladder
    assert snapshot.partial and snapshot.shards == 3
    assert snapshot.worker_load == 2  # what the live shards hold: a lower bound
    [failure] = snapshot.failed_shards
    assert "127.0.0.1" in failure and "hunter2" not in failure


async def test_every_shard_dead_makes_the_reading_unavailable(urls: list[str]) -> None:
    dead = [f"redis://:hunter2@127.0.0.1:{free_port()}/0" for _ in range(2)]
    with pytest.raises(MetricsUnavailable) as caught:
        await read(dead, timeout=0.5)
    assert str(caught.value).count("Redis shard") == 2  # every failure reported
    assert "hunter2" not in str(caught.value)


def _hb(pod: str, role: str = "protocol", **fields: object) -> Heartbeat:
    base = {"process_id": f"{pod}-1-abc", "role": role, "pod": pod, "connections": 0, "inbox": 0,
            "draining": False, "ts": 0.0}
    return Heartbeat(**(base | fields))  # type: ignore[arg-type]


def test_heartbeats_of_pods_that_are_gone_or_terminating_are_ignored() -> None:
    snapshot = Snapshot(0.0, {}, {}, (
        _hb("web-a", connections=100), _hb("web-gone", connections=100), _hb("w-a", "worker", held=7),
        _hb("w-gone", "worker", held=50)))
    listed = snapshot.only_pods({"protocol": ["web-a", "web-b"], "worker": ["w-a"]})
    assert listed.connections == 100  # not 200: web-gone's clients reconnected to web-a
    assert listed.worker_held == 7
    assert listed.unlisted_heartbeats == 2


async def test_held_messages_of_workers_are_worker_load(urls: list[str]) -> None:
    now = time.time()
    redis.Redis.from_url(urls[0]).zadd("asgichat.persist", {"m1": now})
    redis.Redis.from_url(urls[1]).hset("asgi:proc:worker-a-1-ab", mapping={
        "role": "worker", "pod": "worker-a", "connections": 0, "inbox": 0, "held": 120, "draining": 0, "ts": now})
    snapshot = await read(urls)
    assert snapshot.worker_held == 120
    assert snapshot.worker_load == 121


async def test_processes_are_found_through_the_registry_without_scan(urls: list[str]) -> None:
    now = time.time()
    client = redis.Redis.from_url(urls[0])
    for pid, expires in (("web-a-1-aa", now + 15), ("web-b-1-bb", now - 30)):  # web-b was killed
        client.hset(f"asgi:proc:{pid}", mapping={
            "role": "protocol", "pod": pid[:5], "connections": 10, "inbox": 0, "draining": 0, "ts": now})
        client.zadd(registry_key("asgi"), {pid: expires})
    # Registered, its hash gone (deleted at exit): no process, no error.
    client.zadd(registry_key("asgi"), {"web-c-1-cc": now + 15})
    scans: list[object] = []
    reader = RedisMetrics(urls)
    original = reader._clients[0].scan_iter
    reader._clients[0].scan_iter = lambda *a, **k: scans.append(a) or original(*a, **k)  # type: ignore[method-assign]
    try:
        snapshot = await reader.read(CHANNELS)
    finally:
        await reader.close()
    assert snapshot.pod_connections == {"web-a": 10}  # web-b's expired member is not read
    assert scans == []  # the registry answered: no SCAN of the keyspace


async def test_a_shard_without_a_registry_is_scanned(urls: list[str]) -> None:
    # Processes of an app older than the registry write only their hash.
    redis.Redis.from_url(urls[1]).hset("asgi:proc:web-a-1-aa", mapping={
        "role": "protocol", "pod": "web-a", "connections": 3, "inbox": 0, "draining": 0, "ts": time.time()})
    assert (await read(urls)).pod_connections == {"web-a": 3}


async def test_freshness_is_judged_after_the_reads() -> None:
    class SlowRedis(RedisMetrics):
        async def _read_shard(self, client, channels, now):  # type: ignore[no-untyped-def]
            # The shard answers 10 s later, with a heartbeat written just now.
            clock[0] += 10
            beat = _hb("web-a", connections=5, ts=clock[0])
            return dict.fromkeys(channels, 0), dict.fromkeys(channels, 0), [beat], 0, None

    clock = [1000.0]
    reader = SlowRedis(["redis://127.0.0.1:1/0"])
    import parley_operator.metrics as metrics_module
    real_time = metrics_module.time.time
    metrics_module.time.time = lambda: clock[0]  # type: ignore[assignment]
    try:
        snapshot = await reader.read(CHANNELS)
    finally:
        metrics_module.time.time = real_time  # type: ignore[assignment]
        await reader.close()
    assert snapshot.connections == 5 and snapshot.stale_heartbeats == 0


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://user:pw@host/1", "redis://user:***@host/1"),
    ("redis://host:6379/0", "redis://host:6379/0"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_parse_heartbeat_tolerates_bytes_and_rejects_garbage() -> None:
    hb = parse_heartbeat("w-1-a", {b"role": b"worker", b"pod": b"w", b"connections": b"0", b"inbox": b"2",
                               b"draining": b"0", b"ts": b"1700000000.5"})
    assert hb is not None and hb.inbox == 2 and hb.ts == 1700000000.5
    assert parse_heartbeat("p", {b"role": b"protocol", b"ts": b"yesterday"}) is None


async def test_heartbeats_are_read_under_the_platforms_prefix_only(urls: list[str]) -> None:
    now = time.time()
    client = redis.Redis.from_url(urls[0])
    mine = {"role": "protocol", "pod": "web-a", "connections": 7, "inbox": 0, "draining": 0, "ts": now}
    client.hset("parley.ns.chat.:proc:web-a-1-abc", mapping=mine)
    # Another platform on the same Redis, and the pre-prefix key format: neither is ours.
    client.hset("parley.ns.other.:proc:web-b-1-abc", mapping={**mine, "pod": "web-b", "connections": 900})
    client.hset("parley:proc:web-c-1-abc", mapping={**mine, "pod": "web-c", "connections": 900})
    client.zadd("parley.ns.chat.chat.persist", {"m1": now, "m2": now})
    client.zadd("parley.ns.other.chat.persist", {"x": now})

    snapshot = await read(urls, prefix="parley.ns.chat.")
    assert snapshot.pod_connections == {"web-a": 7}
    assert snapshot.queue_depth["chat.persist"] == 2


async def test_malformed_heartbeats_are_rejected_without_failing_the_poll(
        urls: list[str], caplog: pytest.LogCaptureFixture) -> None:
    now = time.time()
    client = redis.Redis.from_url(urls[0])
    good = {"role": "protocol", "pod": "web-a", "connections": 5, "inbox": 0, "draining": 0, "ts": now}
    client.hset("asgi:proc:web-a-1-abc", mapping=good)
    client.hset("asgi:proc:web-a-2-abc", mapping={**good, "connections": "inf"})
    client.hset("asgi:proc:web-a-3-abc", mapping={**good, "connections": -4})
    client.hset("asgi:proc:web-a-4-abc", mapping={**good, "pod": "web-b"})  # claims another pod's load
    client.set("asgi:proc:web-a-5-abc", "not a hash")  # WRONGTYPE for HGETALL
    snapshot = await read(urls)
    assert snapshot.pod_connections == {"web-a": 5}
    assert snapshot.rejected_heartbeats == 4
    assert "ignoring malformed heartbeat" in caplog.text


GOOD = {"role": "protocol", "pod": "chat-protocol-7d9f-x2x", "connections": "12", "inbox": "3",
        "draining": "0", "ts": "1700000000.5"}
PID = "chat-protocol-7d9f-x2x-1-3fa2b1"
MALFORMED = [
    ("connections inf", {"connections": "inf"}),
    ("connections -inf", {"connections": "-inf"}),
    ("connections nan", {"connections": "nan"}),
    ("connections negative", {"connections": "-1"}),
    ("connections fractional", {"connections": "1.5"}),
    ("connections huge", {"connections": "1e300"}),
    ("connections over the bound", {"connections": str(10_000_001)}),
    ("connections text", {"connections": "many"}),
    ("inbox inf", {"inbox": "inf"}),
    ("inbox negative", {"inbox": "-7"}),
    ("inbox huge", {"inbox": "99999999999999999999"}),
    ("ts nan", {"ts": "nan"}),
    ("ts inf", {"ts": "inf"}),
    ("ts text", {"ts": "yesterday"}),
    ("pod of another process", {"pod": "chat-protocol-other-abc"}),
    ("pod that is a prefix only", {"pod": "chat-protocol-7d9f"}),
    ("pod that is not a name", {"pod": "../../etc"}),
    ("pod that is huge", {"pod": "a" * 10_000}),
]


@pytest.mark.parametrize(("name", "change"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_parse_heartbeat_rejects(name: str, change: dict[str, str]) -> None:
    assert parse_heartbeat(PID, {**GOOD, **change}) is None
    with pytest.raises(BadHeartbeat):
        check_heartbeat(PID, {**GOOD, **change})


def test_parse_heartbeat_rejects_a_missing_ts_and_non_utf8() -> None:
    assert parse_heartbeat(PID, {k: v for k, v in GOOD.items() if k != "ts"}) is None
    assert parse_heartbeat(PID, {**GOOD, "pod": b"\xff\xfe"}) is None


ACCEPTED = [
    ("as written by the app", {}, 12),
    ("float formatting of an integer", {"connections": "12.0"}, 12),
    ("zero", {"connections": "0"}, 0),
    ("at the bound", {"connections": str(10_000_000)}, 10_000_000),
    ("no pod field: the process is its own pod", {"pod": ""}, 12),
    ("no counts: zero", {"connections": None}, 0),
]


@pytest.mark.parametrize(("name", "change", "connections"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_parse_heartbeat_accepts(name: str, change: dict[str, str | None], connections: int) -> None:
    fields = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    hb = parse_heartbeat(PID, fields)
    assert hb is not None and hb.connections == connections


def test_a_pod_name_longer_than_a_hostname_matches_its_truncated_hostname() -> None:
    pod = "p" * 70  # hostname = the first 63 characters
    hb = parse_heartbeat(f"{'p' * 63}-12-abcdef", {**GOOD, "pod": pod})
    assert hb is not None and hb.pod == pod


async def test_the_age_of_the_oldest_live_message_is_read(urls: list[str]) -> None:
    now = time.time()
    redis.Redis.from_url(urls[0]).zadd("asgichat.persist", {"new": now - 5, "dead": now - 600})
    redis.Redis.from_url(urls[1]).zadd("asgichat.bot", {"older": now - 20})
    snapshot = await read(urls)
    assert 19 < snapshot.oldest_wait < 25  # the 600 s old one is dead (expired), not waiting
