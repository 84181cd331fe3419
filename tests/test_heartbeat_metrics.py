"""What the operator and Prometheus read: per-process heartbeats in Redis, /metrics on each process."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import redis.asyncio as aioredis

from chat import contract
from embedded_redis import free_port
from tests.helpers import WsClient, amake_user, fetch

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


async def heartbeats(url: str) -> list[dict[str, str]]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        found = [key async for key in client.scan_iter(match=contract.heartbeat_pattern())]
        return [await client.hgetall(key) | {"ttl": str(await client.ttl(key))} for key in found]
    finally:
        await client.aclose()


async def wait_for(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


async def test_processes_publish_their_load_and_metrics(live_stack):
    url = os.environ["REDIS_URLS"].split(",")[0]
    _, token = await amake_user("alice")
    protocol_metrics_port = free_port()
    port = live_stack.start_protocol(POD_NAME="protocol-pod-a", PARLEY_METRICS_PORT=str(protocol_metrics_port))
    metrics_port = free_port()
    live_stack.start_worker(PARLEY_METRICS_PORT=str(metrics_port), POD_NAME="worker-pod-a")
    clients = [await WsClient.connect(port, token) for _ in range(3)]

    async def protocol_with_three():
        beats = await heartbeats(url)
        return [b for b in beats if b.get("role") == "protocol" and b.get("connections") == "3"]

    [beat] = await wait_for(protocol_with_three)
    assert beat["pod"] == "protocol-pod-a" and beat["draining"] == "0"
    assert 0 < int(beat["ttl"]) <= 15 and abs(float(beat["ts"]) - time.time()) < 10

    async def worker_beats():
        return [b["pod"] for b in await heartbeats(url) if b.get("role") == "worker"]

    assert await wait_for(worker_beats) == ["worker-pod-a"]
    [worker] = [b for b in await heartbeats(url) if b.get("role") == "worker"]
    assert worker["held"] == "0"  # messages taken from Redis, not stored yet: none while idle

    # Both processes are in the registry the operator reads instead of scanning the keyspace.
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        registered = await client.zrangebyscore(contract.registry_key(), time.time(), "+inf")
        live = [key.removeprefix(contract.heartbeat_key("")) async for key in
                client.scan_iter(match=contract.heartbeat_pattern())]
    finally:
        await client.aclose()
    assert len(live) == 2 and sorted(registered) == sorted(live)

    # Metrics on a port of their own; the public listener has none.
    protocol_metrics = await asyncio.to_thread(fetch, f"http://127.0.0.1:{protocol_metrics_port}/metrics")
    assert "parley_connections 3.0" in protocol_metrics
    worker_metrics = await wait_for(
        lambda: asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics_port}/metrics")
    )
    assert 'parley_channel_queue_depth{channel="chat.persist"} 0.0' in worker_metrics

    for client in clients:
        await client.close()

    async def protocol_with_none():
        beats = await heartbeats(url)
        return [b for b in beats if b.get("role") == "protocol" and b.get("connections") == "0"]

    await wait_for(protocol_with_none)
