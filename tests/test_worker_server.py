"""The worker process keeps consuming when one of its listeners fails, and says why.

A listener that ended (an exception, or a CancelledError that redis-py raised without anyone
cancelling) used to end the whole worker: the process stayed up, its heartbeat kept saying
"healthy", and every later send waited for an ack that never came.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from redis.exceptions import ResponseError

from chat.models import Message
from chat.services import create_group
from chat.worker_server import ParleyWorker
from parley.asgi import application
from tests.helpers import amake_user

pytestmark = pytest.mark.django_db(transaction=True)


async def _ack_of(comm: WebsocketCommunicator, client_msg_id: str, timeout: float = 10) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = json.loads(await comm.receive_from(max(0.1, deadline - loop.time())))
        if frame["type"] in ("ack", "error") and frame.get("client_msg_id") == client_msg_id:
            return frame


async def _send_twice_through(fault: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    layer = get_channel_layer()
    real_receive = layer.receive_batch
    faults = {"left": 1}

    async def receive_with_one_fault(channel: str, *args: Any) -> list[dict[str, Any]]:
        if channel == "chat.persist" and faults["left"]:
            faults["left"] -= 1
            raise fault
        return await real_receive(channel, *args)

    layer.receive_batch = receive_with_one_fault
    worker = ParleyWorker(application=application, channels=["chat.persist", "chat.bot"], channel_layer=layer)
    task = asyncio.get_running_loop().create_task(worker.handle())
    try:
        alice, token = await amake_user("alice")
        room = await database_sync_to_async(create_group)(alice, "team", False)
        comm = WebsocketCommunicator(application, f"/ws/?token={token}")
        assert (await comm.connect())[0]
        await comm.send_json_to({"type": "join", "room": room.pk})
        for n in (1, 2):
            await comm.send_json_to({"type": "send", "room": room.pk, "body": f"m{n}", "client_msg_id": f"m{n}"})
            ack = await _ack_of(comm, f"m{n}")
            assert ack["type"] == "ack" and ack["seq"] == n, ack
        assert faults["left"] == 0, "the fault was never injected: this test tested nothing"
        assert not task.done(), "the worker stopped"
        bodies = Message.objects.filter(room=room).values_list("body", flat=True)
        stored = await database_sync_to_async(list)(bodies)
        assert sorted(stored) == ["m1", "m2"]
        assert any("listener of chat.persist" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
        await comm.disconnect()
    finally:
        layer.receive_batch = real_receive
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_listener_that_crashes_is_restarted_and_the_crash_logged(caplog):
    await _send_twice_through(ResponseError("a reply the layer did not expect"), caplog)


async def test_a_cancellation_nobody_asked_for_does_not_stop_the_worker(caplog):
    await _send_twice_through(asyncio.CancelledError(), caplog)


async def test_a_stopping_worker_stores_what_it_took_and_leaves_the_rest_in_redis():
    layer = get_channel_layer()
    alice, _ = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    worker = ParleyWorker(application=application, channels=["chat.persist"], channel_layer=layer)
    task = asyncio.get_running_loop().create_task(worker.handle())
    await asyncio.sleep(0.3)
    for n in range(20):
        await layer.send("chat.persist", {"type": "persist.message", "room": room.pk, "sender": alice.pk,
                                          "body": f"m{n}", "client_msg_id": f"c{n}", "reply_to": None})
    os.kill(os.getpid(), signal.SIGTERM)  # the worker's own handler: what Kubernetes sends
    await asyncio.wait_for(task, 10)
    stored = await database_sync_to_async(Message.objects.filter(room=room).count)()
    left = await layer.receive_batch("chat.persist", 100, 1)
    # Nothing lost between the two: taken means stored, the rest waits for the next worker.
    assert stored + len(left) == 20, (stored, len(left))
    assert stored > 0


async def test_a_receive_waiting_on_an_empty_channel_ends_when_cancelled():
    # redis-py turns a cancellation inside BZPOPMIN into a ConnectionError; a receive that
    # retried it as an outage never ended, and the worker (or a test's event loop) hung on stop.
    layer = get_channel_layer()
    waiting = asyncio.ensure_future(layer.receive_batch("test.empty", 10, 30))
    await asyncio.sleep(0.3)
    waiting.cancel()
    done, _ = await asyncio.wait([waiting], timeout=5)
    assert done, "the cancelled receive is still running"
    assert waiting.cancelled()
