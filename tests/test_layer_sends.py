"""Channel-layer sends from many sockets at once (`parley.layers.SendPipeline`), on a real Redis.

A protocol process's sockets send to `chat.persist` through one layer. When its event loop falls
behind for a moment, many sockets' `send` frames are handled in the same turn: sent one by one,
each held a Redis connection of its own, and a pool that had not needed that many yet opened
them all there and then, ~1 ms of the loop each. That stalled Parley on Daphne for 100-300 ms
under load (docs/benchmarks.md). These tests hold the sends of a burst to one connection, and
check that batching them changes nothing a sender sees.
"""

from __future__ import annotations

import asyncio

import pytest
import redis
from channels.exceptions import ChannelFull
from redis.exceptions import RedisError

from embedded_redis import EmbeddedRedis
from parley.layers import ParleyChannelLayer

CHANNEL = "chat.persist"
# A burst as one protocol process sees it in `make bench`: one sending socket per room of 20,
# 2,000 sockets.
SENDERS = 100


@pytest.fixture
def server():
    with EmbeddedRedis() as started:
        yield started


def connections_accepted(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


async def drain(layer: ParleyChannelLayer, expected: int) -> list[dict]:
    got: list[dict] = []
    while len(got) < expected:
        batch = await layer.receive_batch(CHANNEL, 500, 2.0)
        assert batch, f"only {len(got)} of {expected} messages arrived"
        got.extend(batch)
    return got


async def test_a_burst_of_sends_from_many_sockets_shares_one_connection(server):
    layer = ParleyChannelLayer(hosts=[server.url], capacity=10_000)
    before = connections_accepted(server.url)

    async def socket(n: int) -> None:
        for k in range(3):  # a socket's sends follow one another, as the consumer makes them
            await layer.send(CHANNEL, {"type": "persist.message", "sender": n, "k": k})

    await asyncio.gather(*(socket(n) for n in range(SENDERS)))
    # Sent one by one, every socket waiting at once opened its own connection (100 here).
    assert connections_accepted(server.url) - before <= 2
    got = await drain(layer, 3 * SENDERS)
    by_sender: dict[int, list[int]] = {}
    for message in got:
        by_sender.setdefault(message["sender"], []).append(message["k"])
    assert by_sender == {n: [0, 1, 2] for n in range(SENDERS)}
    await layer.flush()


async def test_a_full_channel_refuses_only_the_sends_beyond_its_capacity(server):
    layer = ParleyChannelLayer(hosts=[server.url], channel_capacity={CHANNEL: 5})
    results = await asyncio.gather(
        *(layer.send(CHANNEL, {"type": "persist.message", "n": n}) for n in range(8)), return_exceptions=True
    )
    assert [r is None for r in results] == [True] * 5 + [False] * 3
    assert all(isinstance(r, ChannelFull) for r in results[5:])
    assert sorted(m["n"] for m in await drain(layer, 5)) == [0, 1, 2, 3, 4]
    await layer.flush()


async def test_a_cancelled_sender_leaves_the_others_sends_alone(server):
    layer = ParleyChannelLayer(hosts=[server.url])
    sends = [asyncio.ensure_future(layer.send(CHANNEL, {"type": "persist.message", "n": n})) for n in range(10)]
    await asyncio.sleep(0)  # all ten are waiting for the same pipeline
    sends[3].cancel()
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    assert all(r is None for i, r in enumerate(results) if i != 3)
    got = {m["n"] for m in await drain(layer, 9)}
    assert got >= set(range(10)) - {3}
    await layer.flush()


async def test_every_waiting_send_hears_that_redis_is_down(server):
    layer = ParleyChannelLayer(hosts=[server.url])
    await layer.send(CHANNEL, {"type": "persist.message", "n": -1})  # the pool is connected
    server.stop()
    results = await asyncio.wait_for(
        asyncio.gather(*(layer.send(CHANNEL, {"type": "persist.message", "n": n}) for n in range(20)),
                       return_exceptions=True),
        timeout=30,
    )
    # The consumer answers these with `unavailable` (RedisError or OSError): none may hang or pass.
    assert all(isinstance(r, RedisError | OSError) for r in results), results


async def test_concurrent_sends_over_two_shards_reach_their_receivers():
    """Each shard has its own pipeline: a burst to channels on both arrives where it is read."""
    with EmbeddedRedis() as first, EmbeddedRedis() as second:
        layer = ParleyChannelLayer(hosts=[first.url, second.url])
        channels = [f"test.queue{n}" for n in range(12)]
        assert {layer.consistent_hash(channel) for channel in channels} == {0, 1}
        await asyncio.gather(*(layer.send(channel, {"type": "test.message", "n": n, "k": k})
                               for k in range(5) for n, channel in enumerate(channels)))
        for n, channel in enumerate(channels):
            got = await layer.receive_batch(channel, 10, 2.0)
            # (Sends made in the same instant may share a score: compare what arrived, not its order.)
            assert sorted((m["n"], m["k"]) for m in got) == [(n, k) for k in range(5)]
        await layer.flush()


async def test_a_process_with_a_skewed_clock_neither_drops_nor_jumps_the_others_sends(server, monkeypatch):
    """Queue order and expiry go by Redis's clock. channels-redis scored a message with the sending
    process's time.time() and dropped entries older than that process's now - expiry: a process
    90 s ahead deleted what the others had queued, and its own sends sorted after theirs."""
    import time

    layer = ParleyChannelLayer(hosts=[server.url])
    real_time = time.time
    await layer.send(CHANNEL, {"type": "persist.message", "n": 1})  # a process with a good clock
    monkeypatch.setattr(time, "time", lambda: real_time() + 90)  # this one runs 90 s ahead
    await layer.send(CHANNEL, {"type": "persist.message", "n": 2})
    monkeypatch.setattr(time, "time", real_time)
    await layer.send(CHANNEL, {"type": "persist.message", "n": 3})
    got = await drain(layer, 3)
    assert [m["n"] for m in got] == [1, 2, 3]
    await layer.flush()


async def test_a_burst_is_received_in_the_order_it_was_sent(server):
    layer = ParleyChannelLayer(hosts=[server.url], capacity=1000)
    await asyncio.gather(*(layer.send(CHANNEL, {"type": "persist.message", "n": n}) for n in range(300)))
    got = await drain(layer, 300)
    assert [m["n"] for m in got] == list(range(300))
    await layer.flush()
