"""A client that cannot keep up is cut off (4008) and never slows its room."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest
from channels.db import database_sync_to_async

from chat.services import create_group
from embedded_redis import free_port
from tests.helpers import WsClient, amake_user, client_frame, fetch, messages_in, raw_websocket, read_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
async def test_a_client_that_stops_reading_is_closed_and_the_room_goes_on(live_stack, server):
    alice, alice_token = await amake_user("alice")
    _, bob_token = await amake_user("bob")
    _, carol_token = await amake_user("carol")
    room = await database_sync_to_async(create_group)(alice, "busy", False)
    # Both servers' send() waits while the socket's buffers are full (Daphne through
    # parley.daphne_server), so backpressure reaches the consumer's bounded outbox.
    metrics_port = free_port()
    port = live_stack.start_protocol(
        server=server, PARLEY_SEND_BUFFER="1000", PARLEY_RATE_PER_SECOND="10000", PARLEY_RATE_BURST="10000",
        PARLEY_METRICS_PORT=str(metrics_port),
    )
    live_stack.start_worker()
    sender = await WsClient.connect(port, alice_token)
    fast = await WsClient.connect(port, bob_token)

    # The slow client: a raw socket with a tiny receive buffer that joins and then never reads.
    slow = raw_websocket(port, f"/ws/?token={carol_token}")
    slow.sendall(client_frame(f'{{"type":"join","room":{room.pk}}}'.encode()))
    for client in (sender, fast):
        await client.join(room.pk)

    # More than the kernel's socket buffers on both sides can absorb (loopback autotunes to MBs).
    body = "x" * 4000
    total = 3500

    async def send_all() -> None:
        for n in range(total):
            await sender.send({"type": "send", "room": room.pk, "body": body, "client_msg_id": f"f{n}"})

    # Counted as they come (not by rescanning every frame): the readers must outpace the server.
    async def read_acks() -> None:
        acks = 0
        while acks < total:
            acks += (await sender.recv(timeout=60))["type"] == "ack"

    async def read_room() -> None:
        messages = 0
        while messages < total:
            messages += (await fast.recv(timeout=60))["type"] == "message"

    await asyncio.wait_for(asyncio.gather(send_all(), read_acks(), read_room()), 120)
    assert messages_in(fast.frames, room.pk) == list(range(1, total + 1))

    # The server gave up on the slow client (the counter) and stopped queueing for it: what it
    # can still read is an in-order prefix of the room, far from all of it.
    metrics = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics_port}/metrics")
    assert "parley_slow_client_closes_total 1.0" in metrics
    stream = await asyncio.to_thread(read_for, slow, 3.0)
    seqs = [int(m) for m in re.findall(rb'"seq":(\d+)', stream)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) < total - 1000
    await sender.close()
    await fast.close()


async def test_the_client_is_told_4008_once_its_buffer_overflows(monkeypatch):
    """The consumer's policy, with a socket whose writes block until released."""
    import json

    from channels.testing import WebsocketCommunicator

    from chat import consumers
    from parley.asgi import application

    monkeypatch.setattr(consumers, "CONFIG", dataclasses.replace(consumers.CONFIG, send_buffer_frames=5))
    _, token = await amake_user("slowpoke")
    released = asyncio.Event()

    async def socket_that_blocks(scope, receive, send):
        async def blocking_send(message):
            if message["type"] == "websocket.send":
                await released.wait()
            await send(message)

        await application(scope, receive, blocking_send)

    comm = WebsocketCommunicator(socket_that_blocks, f"/ws/?token={token}")
    assert (await comm.connect())[0]
    for n in range(10):
        await comm.send_to(text_data=json.dumps({"type": "ping", "ref": f"p{n}"}))
    await asyncio.sleep(0.2)
    released.set()
    frames = []
    while True:
        output = await comm.receive_output(5)
        if output["type"] == "websocket.close":
            break
        frames.append(json.loads(output["text"]))
    assert output["code"] == 4008
    # hello was written before the socket blocked; at most the buffer's worth of pongs followed.
    assert len(frames) <= 6
