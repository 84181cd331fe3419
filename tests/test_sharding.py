"""Sharding over several real Redis servers: routing, fan-out and what moves when a shard is added."""

from __future__ import annotations

import asyncio
import random

import pytest

from embedded_redis import EmbeddedRedis
from parley.layers import ParleyChannelLayer
from parley.sharding import inbox_key, shard_index


def test_adding_a_shard_moves_only_about_its_share_of_keys():
    keys = [f"parley:room:{n}" for n in range(20_000)]
    three = [f"redis://r{i}:6379/0" for i in range(3)]
    four = [*three, "redis://r3:6379/0"]
    moved = sum(shard_index(three, k) != shard_index(four, k) for k in keys)
    # Ideal is 1/4 of the keys, all of them to the new shard; channels-redis' modulo scheme moves ~3/4.
    assert 0.20 < moved / len(keys) < 0.30
    assert all(shard_index(four, k) == 3 for k in keys if shard_index(three, k) != shard_index(four, k))
    counts = [sum(shard_index(four, k) == i for k in keys) for i in range(4)]
    assert min(counts) > 0.2 * len(keys)  # balanced


def test_shard_choice_does_not_depend_on_the_order_of_urls():
    urls = [f"redis://r{i}:6379/0" for i in range(5)]
    shuffled = random.Random(7).sample(urls, len(urls))
    for n in range(500):
        key = f"k{n}"
        assert urls[shard_index(urls, key)] == shuffled[shard_index(shuffled, key)]


def test_process_channels_hash_by_their_inbox():
    assert inbox_key("specific.abc!def") == "specific.abc!"
    assert inbox_key("chat.persist") == "chat.persist"


@pytest.fixture
def two_shards():
    servers = [EmbeddedRedis().start(), EmbeddedRedis().start()]
    yield [s.url for s in servers]
    for server in servers:
        server.stop()


async def test_direct_sends_reach_their_receiver_on_every_shard(two_shards):
    """channels-redis 4.3.0 sends half of these to the wrong shard (channels_redis#221)."""
    layer = ParleyChannelLayer(hosts=two_shards)
    channels = [await layer.new_channel() for _ in range(40)]
    for n, channel in enumerate(channels):
        await layer.send(channel, {"type": "test.message", "n": n})
    received = [await asyncio.wait_for(layer.receive(channel), 5) for channel in channels]
    assert [m["n"] for m in received] == list(range(40))
    await layer.flush()


async def test_named_channels_live_on_one_shard_and_are_received_promptly(two_shards):
    layer = ParleyChannelLayer(hosts=two_shards)
    for name in ("chat.persist", "chat.bot", "chat.other"):
        loop = asyncio.get_running_loop()
        for n in range(5):
            await layer.send(name, {"type": "job", "n": n})
        started = loop.time()
        got = [(await asyncio.wait_for(layer.receive(name), 3))["n"] for _ in range(5)]
        assert got == list(range(5))
        # A round-robin receive would block 5 s on the empty shard before finding these.
        assert loop.time() - started < 1.0
    await layer.flush()


async def test_room_fanout_works_across_two_shards(two_shards, monkeypatch):
    from chat import contract, fanout, redis_pool

    monkeypatch.setattr(redis_pool, "shard_urls", lambda: two_shards)
    monkeypatch.setattr(fanout, "shard_urls", lambda: two_shards)
    rooms = list(range(1, 21))
    assert {shard_index(two_shards, contract.room_topic(r)) for r in rooms} == {0, 1}

    class Member:
        def __init__(self) -> None:
            self.got: list[tuple[int, int | None, str]] = []

        def deliver(self, room: int, seq: int | None, text: str) -> None:
            self.got.append((room, seq, text))

        def resync(self, room: int) -> None:
            pass

    bus = fanout.RoomBus("test-process")
    member = Member()
    for room in rooms:
        await bus.join(room, member)
    await fanout.publish_many([(room, 1, f'{{"room":{room}}}') for room in rooms])
    for _ in range(100):
        if len(member.got) == len(rooms):
            break
        await asyncio.sleep(0.02)
    assert sorted(member.got) == sorted((room, 1, f'{{"room":{room}}}') for room in rooms)
    await bus.close()


async def _subscribed(url: str, topics: list[str]):
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(*topics)
    for _ in topics:  # the subscribe confirmations
        await pubsub.get_message(timeout=2)
    return client, pubsub


async def _received(pubsub, count: int) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []
    for _ in range(200):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is not None:
            got.append((message["channel"].decode(), message["data"].decode()))
        if len(got) == count:
            break
    return got


@pytest.mark.parametrize("shards", [1, 2])
async def test_a_batchs_frames_are_published_before_its_acks_on_one_shard_or_several(two_shards, monkeypatch, shards):
    from chat import contract, fanout, redis_pool

    urls = two_shards[:shards]
    monkeypatch.setattr(redis_pool, "shard_urls", lambda: urls)
    monkeypatch.setattr(fanout, "shard_urls", lambda: urls)
    rooms = list(range(1, 7))
    pids = [f"proc-{n}" for n in range(4)]
    topics = [contract.room_topic(r) for r in rooms] + [contract.process_topic(p) for p in pids]
    by_shard = {n: [t for t in topics if shard_index(urls, t) == n] for n in range(shards)}
    if shards == 2:
        assert all(by_shard.values()), "the topics should fall on both shards"
    subscribers = [await _subscribed(urls[n], mine) for n, mine in by_shard.items()]
    try:
        await fanout.publish_then_reply(
            [(room, 1, f'{{"room":{room}}}') for room in rooms],
            [(rooms[n], f"{pid}|{n}", f'{{"ack":{n}}}') for n, pid in enumerate(pids)],
        )
        seen = [await _received(pubsub, len(by_shard[n])) for n, (_, pubsub) in enumerate(subscribers)]
    finally:
        for client, pubsub in subscribers:
            await pubsub.aclose()
            await client.aclose()
    everything = [message for got in seen for message in got]
    assert sorted(name for name, _ in everything) == sorted(topics)
    assert (contract.room_topic(3), contract.encode_room_payload(1, '{"room":3}')) in everything
    assert (contract.process_topic("proc-2"), contract.encode_reply_payload([("2", '{"ack":2}')])) in everything
    if shards == 1:  # one connection sees them in the order they were sent: frames, then acks
        kinds = [name.startswith(contract.room_topic_prefix()) for name, _ in seen[0]]
        assert kinds == [True] * len(rooms) + [False] * len(pids)


async def test_a_lost_shard_withholds_its_own_rooms_acks_and_no_others(monkeypatch):
    """A batch with rooms on both shards while one is down: the healthy shard's rooms get their
    frames and their senders their acks (through the healthy shard, even for a process whose
    topic lives on the lost one); only the lost shard's messages go unacked, to be retried."""
    from chat import contract, fanout, redis_pool

    servers = [EmbeddedRedis().start(), EmbeddedRedis().start()]
    urls = [s.url for s in servers]
    monkeypatch.setattr(redis_pool, "shard_urls", lambda: urls)
    monkeypatch.setattr(fanout, "shard_urls", lambda: urls)
    healthy = [r for r in range(1, 100) if shard_index(urls, contract.room_topic(r)) == 0][:3]
    lost = [r for r in range(1, 100) if shard_index(urls, contract.room_topic(r)) == 1][:3]
    pid = next(f"proc-{n}" for n in range(100) if shard_index(urls, contract.process_topic(f"proc-{n}")) == 1)
    topics = [contract.room_topic(r) for r in healthy] + [contract.process_topic(pid)]
    client, pubsub = await _subscribed(urls[0], topics)
    try:
        servers[1].stop()
        rooms = healthy + lost
        withheld = await fanout.publish_then_reply(
            [(room, 1, f'{{"room":{room}}}') for room in rooms],
            [(room, f"{pid}|{n}", f'{{"ack":{n}}}') for n, room in enumerate(rooms)],
        )
        got = await _received(pubsub, len(healthy) + 1)
    finally:
        await pubsub.aclose()
        await client.aclose()
        for server in servers:
            server.stop()
    assert withheld == len(lost)
    assert sorted(name for name, _ in got) == sorted(topics)
    replies = [payload for name, payload in got if name == contract.process_topic(pid)]
    assert replies == [contract.encode_reply_payload([(str(n), f'{{"ack":{n}}}') for n in range(len(healthy))])]
