"""The contract between processes (chat.contract) against every copy of it outside the app.

The operator is a package of its own and keeps its own copies of the channel names, the
heartbeat key layout and the queue-depth count; these tests are where they meet the app's.
"""

from __future__ import annotations

import time

import pytest
from channels.layers import get_channel_layer

from chat import contract
from parley.config import CONFIG
from parley_operator import metrics as operator_metrics
from parley_operator import spec as operator_spec


def test_the_operator_scales_workers_on_the_channels_the_workers_consume():
    assert tuple(operator_spec.DEFAULT_CHANNELS) == contract.WORKER_CHANNELS


def test_the_operator_finds_the_heartbeats_the_processes_write():
    key = contract.heartbeat_key("p-1")
    assert key.startswith(operator_metrics.heartbeat_prefix(CONFIG.channel_prefix))
    assert key == operator_metrics.heartbeat_prefix(CONFIG.channel_prefix) + "p-1"


@pytest.mark.parametrize(("seq", "frame"), [(7, '{"type":"message"}'), (None, '{"type":"typing"}')])
def test_a_room_payload_reads_back_as_written(seq, frame):
    assert contract.decode_room_payload(contract.encode_room_payload(seq, frame).encode()) == (seq, frame)


@pytest.mark.parametrize("bad", [b"0\n{}", b"-3\n{}", b"x\n{}", b"1\nnot json", b"1\n[1]", b""])
def test_a_room_payload_parley_did_not_write_is_refused(bad):
    with pytest.raises(ValueError):
        contract.decode_room_payload(bad)


def test_replies_reach_the_connections_they_were_addressed_to():
    pid, key = contract.split_reply_address(contract.reply_address("host|1234", 42))
    assert pid == "host|1234"
    # A body with a newline: JSON escapes it, so entries still split where they should.
    frames = ['{"type":"ack","seq":1}', '{"type":"error","message":"line\\nbreak"}']
    payload = contract.encode_reply_payload([(key, frames[0]), (7, frames[1])])
    assert contract.decode_reply_payload(payload.encode()) == [(42, frames[0]), (7, frames[1])]


@pytest.mark.parametrize("bad", [b"1", b"x\n{}", b"1\n{}\n2", b"1\nnot json", b""])
def test_a_reply_payload_parley_did_not_write_is_refused(bad):
    with pytest.raises(ValueError):
        contract.decode_reply_payload(bad)


async def test_the_worker_and_the_operator_count_the_same_queue_depth():
    layer = get_channel_layer()
    channel = contract.PERSIST_CHANNEL
    for n in range(7):
        await layer.send(channel, {"type": "persist.message", "n": n})
    connection = layer.connection(layer.consistent_hash(channel))
    # Dead entries (older than the expiry) are not work: neither side may count them.
    await connection.zadd(layer.prefix + channel, {b"expired-entry": time.time() - layer.expiry - 10})
    # A receive killed mid-way leaves its message in the backup queue: still work to do.
    await connection.zadd(layer.prefix + channel + "$inflight", {b"in-backup": time.time()})

    now = time.time()
    reader = operator_metrics.RedisMetrics(CONFIG.redis_urls, prefix=layer.prefix, expiry_seconds=layer.expiry)
    try:
        snapshot = await reader.read([channel], now=now)
    finally:
        await reader.close()
    assert await layer.queue_depth(channel) == 8
    assert snapshot.queue_depth[channel] + snapshot.in_flight[channel] == snapshot.worker_load == 8


def test_the_operator_reads_the_registry_the_processes_write():
    assert contract.registry_key() == operator_metrics.registry_key(CONFIG.channel_prefix)


async def _seen_by_the_operator() -> list[operator_metrics.Heartbeat]:
    from chat import process

    reader = operator_metrics.RedisMetrics(CONFIG.redis_urls, prefix=CONFIG.channel_prefix)
    try:
        snapshot = await reader.read([])
    finally:
        await reader.close()
    return [hb for hb in snapshot.heartbeats if hb.process_id == process.process_id()]


async def _registered() -> bool:
    from chat import process
    from chat.redis_pool import clients

    scores = [await client.zscore(contract.registry_key(), process.process_id()) for client in clients()]
    return any(score is not None for score in scores)


async def test_a_process_is_found_through_the_registry_with_its_held_messages():
    from chat import process

    await process.publish_heartbeat("worker", held=lambda: 42)
    try:
        [beat] = await _seen_by_the_operator()
        assert beat.held == 42 and beat.role == "worker"
        assert await _registered()
    finally:
        await process.retire_heartbeat()


async def test_a_process_with_a_skewed_clock_is_seen_by_redis_time(monkeypatch):
    """A process 90 s ahead must neither look from the future to the operator nor prune the
    others' registrations: the heartbeat's `ts` and the registry's scores are Redis's clock."""
    from chat import process
    from chat.redis_pool import clients

    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 90)
    await process.publish_heartbeat("protocol")
    monkeypatch.setattr(time, "time", real_time)
    try:
        [beat] = await _seen_by_the_operator()
        assert abs(beat.ts - real_time()) < 5
        scores = [await client.zscore(contract.registry_key(), process.process_id()) for client in clients()]
        [score] = [s for s in scores if s is not None]
        assert abs(score - (real_time() + CONFIG.heartbeat_ttl)) < 5
    finally:
        await process.retire_heartbeat()


async def test_a_draining_process_deletes_its_heartbeat_and_registration(monkeypatch):
    import asyncio

    from chat import process

    monkeypatch.setattr(process, "STATE", process.ProcessState())
    await process.publish_heartbeat("protocol")
    assert await _seen_by_the_operator()
    process.STATE.drain()  # what `parley drain` does: the heartbeat goes at once, not after its TTL
    await asyncio.gather(*process._retiring)
    assert await _seen_by_the_operator() == []
    assert not await _registered()


async def test_a_stopped_heartbeat_loop_deletes_its_heartbeat(monkeypatch):
    import asyncio

    from chat import process

    monkeypatch.setattr(process, "STATE", process.ProcessState())
    task = asyncio.get_running_loop().create_task(process.heartbeat_loop("protocol"))
    for _ in range(50):
        if await _seen_by_the_operator():
            break
        await asyncio.sleep(0.05)
    assert await _seen_by_the_operator()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _seen_by_the_operator() == []
    assert not await _registered()
