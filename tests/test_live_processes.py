"""Real Daphne processes and a real worker sharing one Redis: the architecture end to end."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async

from chat.models import Message, Room
from chat.services import create_group
from tests.helpers import WsClient, amake_user, messages_in

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


async def test_message_sent_through_one_daphne_reaches_a_member_on_another(live_stack):
    alice, alice_token = await amake_user("alice")
    _, bob_token = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "ops", False)

    port_a = live_stack.start_protocol()
    port_b = live_stack.start_protocol()
    live_stack.start_worker()

    sender = await WsClient.connect(port_a, alice_token)
    member = await WsClient.connect(port_b, bob_token)
    assert (await sender.join(room.pk))["type"] == "joined"
    assert (await member.join(room.pk))["type"] == "joined"

    await sender.send({"type": "send", "room": room.pk, "body": "across processes", "client_msg_id": "c-1"})
    ack = await sender.expect(lambda f: f["type"] == "ack")
    received = await member.expect(lambda f: f["type"] == "message")

    assert ack["seq"] == received["seq"] == 1
    assert received["body"] == "across processes"
    assert received["sender"]["username"] == "alice"
    stored = await database_sync_to_async(Message.objects.get)(room=room, seq=1)
    assert stored.body == "across processes"
    await sender.close()
    await member.close()


async def test_many_senders_on_two_processes_give_every_member_the_same_gapless_sequence(live_stack):
    users = [await amake_user(f"user{i}") for i in range(4)]
    room = await database_sync_to_async(create_group)(users[0][0], "busy", False)
    ports = [live_stack.start_protocol(), live_stack.start_protocol()]
    live_stack.start_worker()
    clients = [await WsClient.connect(ports[i % 2], token) for i, (_, token) in enumerate(users)]
    for client in clients:
        await client.join(room.pk)

    per_client = 15
    for n in range(per_client):
        for i, client in enumerate(clients):
            frame = {"type": "send", "room": room.pk, "body": f"{i}:{n}", "client_msg_id": f"u{i}-{n}"}
            await client.send(frame)
    total = per_client * len(clients)
    for client in clients:
        while len(messages_in(client.frames, room.pk)) < total:
            await client.expect(lambda f: f["type"] == "message")
    expected = list(range(1, total + 1))
    for client in clients:
        assert messages_in(client.frames, room.pk) == expected
    last_seq = await database_sync_to_async(lambda: Room.objects.get(pk=room.pk).last_seq)()
    assert last_seq == total
    await asyncio.gather(*(c.close() for c in clients))
