"""Readiness follows "can serve most rooms", not "every backend answered this instant".

Real Redis servers (tools/embedded_redis.py): one shard of two stopped leaves the process ready;
both stopped, or the database gone, does not. A shard that accepts and never answers costs the
probe a bounded time, well inside the probe's own timeout (parley_operator.resources).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from chat import health
from chat.process import STATE
from chat.redis_pool import make_client
from embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def two_shards(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EmbeddedRedis]]:
    servers = [EmbeddedRedis().start(), EmbeddedRedis().start()]
    urls = [server.url for server in servers]
    monkeypatch.setattr(health, "clients", lambda: [make_client(url) for url in urls])
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


async def test_one_shard_of_two_down_leaves_the_process_ready(two_shards: list[EmbeddedRedis]) -> None:
    assert await health.readiness() == (200, {"status": "ok", "checks": {
        "database": "ok", "redis0": "ok", "redis1": "ok"}})

    two_shards[1].stop()
    status, body = await health.readiness()
    assert status == 200, body
    assert body == {"status": "degraded", "checks": {"database": "ok", "redis0": "ok", "redis1": "error"}}

    two_shards[0].stop()
    status, body = await health.readiness()
    assert status == 503 and body["status"] == "unavailable"


async def test_a_draining_process_is_not_ready_even_with_every_shard_up(two_shards: list[EmbeddedRedis],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(STATE, "draining", True)
    status, body = await health.readiness()
    assert status == 503 and body["status"] == "draining"


async def test_without_the_database_the_process_is_not_ready(two_shards: list[EmbeddedRedis],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable() -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(health, "_database_ok", unreachable)
    status, body = await health.readiness()
    assert status == 503 and body["checks"]["database"] == "error"


async def test_a_shard_that_never_answers_costs_the_probe_a_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listening socket that never reads: connect succeeds (the kernel's backlog), PING hangs,
    # as behind a dropped route. redis-py's own socket timeout would wait 10 s.
    from parley_operator.resources import READINESS_TIMEOUT_SECONDS

    with EmbeddedRedis() as live, socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        urls = [live.url, f"redis://127.0.0.1:{silent.getsockname()[1]}/0"]
        monkeypatch.setattr(health, "clients", lambda: [make_client(url) for url in urls])
        started = time.monotonic()
        status, body = await health.readiness()
        took = time.monotonic() - started
    assert status == 200 and body["checks"]["redis1"] == "error"
    assert took < READINESS_TIMEOUT_SECONDS - 1, f"readiness took {took:.1f}s"


async def test_a_hung_database_check_is_bounded_and_not_stacked(two_shards: list[EmbeddedRedis],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A database that accepts and never answers: each probe answers in time with the database
    # as `error`, and the probes share the one check still running instead of a thread each.
    release = threading.Event()
    calls = []

    def hung() -> None:
        calls.append(1)
        release.wait(10)

    monkeypatch.setattr(health, "_database_ok", hung)
    try:
        for _ in range(3):
            started = time.monotonic()
            status, body = await health.readiness()
            assert time.monotonic() - started < health.CHECK_TIMEOUT_SECONDS + 1
            assert status == 503 and body["checks"]["database"] == "error"
        assert len(calls) == 1
    finally:
        release.set()
    await asyncio.sleep(0.1)
    status, body = await health.readiness()  # answered again: a fresh check, back to ready
    assert len(calls) == 2 and status == 200, body


@pytest.mark.slow
def test_a_protocol_process_stays_ready_with_one_shard_of_two_stopped(live_stack) -> None:
    # The real server, as the kubelet probes it (pod IP as Host), on two real shards.
    import json
    import urllib.error
    import urllib.request

    def readyz(port: int) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", headers={"Host": "10.244.1.17:8000"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    with EmbeddedRedis() as first, EmbeddedRedis() as second:
        port = live_stack.start_protocol(REDIS_URLS=f"{first.url},{second.url}")
        assert readyz(port)[0] == 200
        second.stop()
        status, body = readyz(port)
        assert (status, body["status"], body["checks"]["redis1"]) == (200, "degraded", "error"), body
        first.stop()
        assert readyz(port)[0] == 503
