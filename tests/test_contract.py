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
