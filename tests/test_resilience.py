"""Faults a user must not notice: a worker stopped mid-stream, Redis restarted, a pod drained.

The promise under test: every message acknowledged to its sender is stored once and reaches
every member, live or after reconnecting, with no gap in the room's seq.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request

import pytest
import websockets
from channels.db import database_sync_to_async

from chat.models import Message, Room
from chat.services import create_group
from embedded_redis import EmbeddedRedis
from stack import PARLEY
from tests.helpers import WsClient, amake_user, messages_in

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


async def send_until_acked(client: WsClient, frame: dict, attempts: int = 40) -> dict:
    """What a well-behaved client does: resend (same client_msg_id) until the server acks."""
    for _ in range(attempts):
        await client.send(frame)
        try:
            reply = await client.expect(
                lambda f: (f["type"] == "ack" and f["client_msg_id"] == frame["client_msg_id"])
                or (f["type"] == "error" and f.get("ref") == frame["client_msg_id"]),
                timeout=2,
            )
        except AssertionError:
            continue
        if reply["type"] == "ack":
            return reply
        await asyncio.sleep(0.25)
    raise AssertionError(f"{frame['client_msg_id']} was never acked")


async def test_stopping_a_worker_mid_stream_loses_no_acked_message(live_stack):
    alice, alice_token = await amake_user("alice")
    _, bob_token = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "ops", False)
    port = live_stack.start_protocol(PARLEY_RATE_PER_SECOND="1000", PARLEY_RATE_BURST="1000")
    worker = live_stack.start_worker()
    sender = await WsClient.connect(port, alice_token)
    member = await WsClient.connect(port, bob_token)
    await sender.join(room.pk)
    await member.join(room.pk)

    total = 60
    for n in range(total):
        await sender.send({"type": "send", "room": room.pk, "body": f"m{n}", "client_msg_id": f"m{n}"})
        if n == 20:
            os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=30)
    live_stack.start_worker()
    # Whatever was not acked is re-sent with its client_msg_id, as the web page does.
    acked = {f["client_msg_id"] for f in sender.frames if f["type"] == "ack"}
    for n in range(total):
        if f"m{n}" not in acked:
            frame = {"type": "send", "room": room.pk, "body": f"m{n}", "client_msg_id": f"m{n}"}
            await send_until_acked(sender, frame)

    while len(set(messages_in(member.frames, room.pk))) < total:
        await member.expect(lambda f: f["type"] == "message")
    assert messages_in(member.frames, room.pk) == list(range(1, total + 1))
    stored = Message.objects.filter(room=room).values_list("body", flat=True)
    bodies = await database_sync_to_async(lambda: sorted(stored))()
    assert bodies == sorted(f"m{n}" for n in range(total))  # each stored exactly once
    await sender.close()
    await member.close()


async def test_redis_restart_loses_nothing_that_was_acked(live_stack):
    redis = EmbeddedRedis().start()
    try:
        live_stack.env["REDIS_URLS"] = redis.url
        alice, alice_token = await amake_user("alice")
        _, bob_token = await amake_user("bob")
        room = await database_sync_to_async(create_group)(alice, "ops", False)
        port = live_stack.start_protocol()
        live_stack.start_worker()
        sender = await WsClient.connect(port, alice_token)
        member = await WsClient.connect(port, bob_token)
        await sender.join(room.pk)
        await member.join(room.pk)
        await send_until_acked(sender, {"type": "send", "room": room.pk, "body": "before", "client_msg_id": "b0"})

        redis.restart()  # every key, queue and subscription is gone
        # A message that reached the database while the bus was down (a worker that committed
        # just before Redis died) must still reach the member once the subscription is back.
        from chat.services import store_batch

        await database_sync_to_async(store_batch)(
            [{"room": room.pk, "sender": alice.pk, "body": "during", "client_msg_id": "d0"}]
        )
        for n in range(3):
            frame = {"type": "send", "room": room.pk, "body": f"after{n}", "client_msg_id": f"a{n}"}
            await send_until_acked(sender, frame)

        while len(set(messages_in(member.frames, room.pk))) < 5:
            await member.expect(lambda f: f["type"] == "message", timeout=20)
        assert messages_in(member.frames, room.pk) == [1, 2, 3, 4, 5]
        last_seq = await database_sync_to_async(lambda: Room.objects.get(pk=room.pk).last_seq)()
        assert last_seq == 5
        await sender.close()
        await member.close()
    finally:
        redis.stop()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


async def test_drain_tells_clients_to_reconnect_and_empties_the_process(live_stack):
    _, token = await amake_user("alice")
    port = live_stack.start_protocol(PARLEY_RECONNECT_JITTER_MS="2000")
    live_stack.start_worker()
    clients = [await WsClient.connect(port, token) for _ in range(3)]
    assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200

    # The preStop hook's command, run as Kubernetes would: it returns once the pod is empty.
    drain = await asyncio.create_subprocess_exec(
        PARLEY, "drain", "--seconds", "20",
        env={**live_stack.env, "PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    for client in clients:
        frame = await client.expect(lambda f: f["type"] == "reconnect")
        assert 0 <= frame["delay_ms"] <= 2000
        await asyncio.wait_for(client.socket.wait_closed(), 10)
        assert client.socket.close_code == 4012
    output, _ = await asyncio.wait_for(drain.communicate(), 30)
    assert drain.returncode == 0, output
    assert b"drained: 0 connections left" in output

    status, body = _get(f"http://127.0.0.1:{port}/readyz")
    assert status == 503 and body["status"] == "draining"
    # A client that still arrives is told to go elsewhere, not served.
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/?token={token}") as late:
        frame = json.loads(await asyncio.wait_for(late.recv(), 10))
        assert frame["type"] == "reconnect" and frame["delay_ms"] >= 1000
        await asyncio.wait_for(late.wait_closed(), 10)
        assert late.close_code == 4012
