"""The WebSocket protocol through Channels' WebsocketCommunicator, with real Redis and database."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from chat import consumers, fanout, presence
from chat.models import Membership, Message, Room
from chat.protocol import dumps
from chat.services import create_group, open_dm, store_batch
from parley.asgi import application
from tests.helpers import amake_user

pytestmark = pytest.mark.django_db(transaction=True)


class Client:
    """A WebsocketCommunicator that keeps every frame it has read."""

    def __init__(self, token: str | None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        path = f"/ws/?token={token}" if token else "/ws/"
        self.comm = WebsocketCommunicator(application, path, headers=headers or [])
        self.frames: list[dict] = []

    async def open(self) -> dict:
        connected, _ = await self.comm.connect()
        assert connected
        return await self.expect("hello")

    async def send(self, frame: dict | str) -> None:
        await self.comm.send_to(text_data=frame if isinstance(frame, str) else json.dumps(frame))

    async def expect(self, frame_type: str, timeout: float = 5, **fields) -> dict:
        while True:
            frame = json.loads(await self.comm.receive_from(timeout))
            self.frames.append(frame)
            if frame["type"] == frame_type and all(frame.get(k) == v for k, v in fields.items()):
                return frame

    async def error(self, code: str, timeout: float = 5) -> dict:
        return await self.expect("error", timeout, code=code)

    async def join(self, room: int) -> dict:
        await self.send({"type": "join", "room": room})
        return await self.expect("joined", room=room)

    def seqs(self, room: int) -> list[int]:
        return [f["seq"] for f in self.frames if f["type"] == "message" and f["room"] == room]

    async def close(self) -> None:
        await self.comm.disconnect()


async def connect(token: str) -> Client:
    client = Client(token)
    await client.open()
    return client


async def test_unauthenticated_socket_is_closed_with_4001():
    for token in (None, "not-a-token"):
        comm = WebsocketCommunicator(application, f"/ws/?token={token}" if token else "/ws/")
        connected, _ = await comm.connect()
        assert connected
        error = json.loads(await comm.receive_from())
        assert error["type"] == "error"
        closed = await comm.receive_output()
        assert closed == {"type": "websocket.close", "code": 4001}


async def test_browser_socket_from_a_foreign_origin_is_refused():
    comm = WebsocketCommunicator(application, "/ws/", headers=[(b"origin", b"https://evil.example")])
    connected, _ = await comm.connect()
    assert not connected


async def test_token_in_authorization_header_is_accepted():
    _, token = await amake_user("hdr")
    client = Client(None, headers=[(b"authorization", f"Bearer {token}".encode())])
    hello = await client.open()
    assert hello["user"]["username"] == "hdr"
    await client.close()


async def test_send_is_acked_after_storage_and_delivered_to_members(worker):
    alice, alice_token = await amake_user("alice")
    _, bob_token = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    a, b = await connect(alice_token), await connect(bob_token)
    await a.join(room.pk)
    joined = await b.join(room.pk)
    assert joined["info"]["kind"] == "group"

    await a.send({"type": "send", "room": room.pk, "body": "hi bob", "client_msg_id": "a-1"})
    ack = await a.expect("ack")
    assert ack == {"type": "ack", "client_msg_id": "a-1", "room": room.pk, "seq": 1, "duplicate": False}
    stored = await database_sync_to_async(Message.objects.get)(room=room, seq=1)
    assert stored.body == "hi bob" and stored.sender_id == alice.pk
    message = await b.expect("message")
    assert message["body"] == "hi bob" and message["seq"] == 1 and message["sender"]["username"] == "alice"
    assert message["kind"] == "text" and message["sent_at"].endswith("Z")
    await a.close()
    await b.close()


async def test_retried_send_is_stored_once_and_acked_with_the_same_seq(worker):
    alice, token = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    a = await connect(token)
    await a.join(room.pk)
    for _ in range(3):
        await a.send({"type": "send", "room": room.pk, "body": "once", "client_msg_id": "retry-1"})
    acks = [await a.expect("ack") for _ in range(3)]
    assert {ack["seq"] for ack in acks} == {1}
    assert sorted(ack["duplicate"] for ack in acks) == [False, True, True]
    assert await database_sync_to_async(Message.objects.filter(room=room).count)() == 1
    await a.send({"type": "send", "room": room.pk, "body": "next", "client_msg_id": "retry-2"})
    assert (await a.expect("ack", client_msg_id="retry-2"))["seq"] == 2
    await a.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_json"),
        (json.dumps({"type": "shout", "room": 1}), "unknown_type"),
        (json.dumps({"room": 1}), "unknown_type"),
        (json.dumps({"type": "send", "room": 1, "body": "x"}), "invalid_frame"),
        (json.dumps({"type": "send", "room": "one", "body": "x", "client_msg_id": "c"}), "invalid_frame"),
        (json.dumps({"type": "send", "room": 1, "body": "", "client_msg_id": "c"}), "invalid_frame"),
        (json.dumps({"type": "join", "room": 1, "extra": True}), "invalid_frame"),
        (json.dumps({"type": "history", "room": 1, "limit": 10_000}), "invalid_frame"),
        (json.dumps({"type": "send", "room": 1, "body": "é" * 2049, "client_msg_id": "big"}), "too_large"),
        ("x" * 100_000, "too_large"),
    ],
    ids=lambda value: value if value in {"bad_json", "unknown_type", "invalid_frame", "too_large"} else None,
)
async def test_bad_input_gets_an_error_frame_and_the_connection_survives(frame, code):
    _, token = await amake_user("fuzzy")
    client = await connect(token)
    await client.send(frame)
    error = await client.error(code)
    assert error["message"]
    await client.send({"type": "ping", "ref": "still-there"})
    assert (await client.expect("pong"))["ref"] == "still-there"
    await client.close()


async def test_error_echoes_the_client_msg_id_of_the_send_it_refuses():
    _, token = await amake_user("refs")
    client = await connect(token)
    await client.send({"type": "send", "room": 999, "body": "x" * 5000, "client_msg_id": "too-big-1"})
    error = await client.error("too_large")
    assert error["ref"] == "too-big-1"
    await client.close()


async def test_binary_frames_are_refused_with_a_code():
    _, token = await amake_user("binary")
    client = await connect(token)
    await client.comm.send_to(bytes_data=b"\x00\x01")
    await client.error("binary_unsupported")
    await client.close()


async def test_flood_is_rate_limited_without_affecting_other_users(worker):
    alice, alice_token = await amake_user("alice")
    _, bob_token = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    flooder, calm = await connect(alice_token), await connect(bob_token)
    await flooder.join(room.pk)
    await calm.join(room.pk)
    for n in range(80):
        await flooder.send({"type": "ping", "ref": f"p{n}"})
    limited = await flooder.error("rate_limited")
    assert limited["ref"].startswith("p")
    await calm.send({"type": "send", "room": room.pk, "body": "calm", "client_msg_id": "calm-1"})
    assert (await calm.expect("ack"))["seq"] == 1
    assert (await flooder.expect("message"))["body"] == "calm"
    await flooder.close()
    await calm.close()


async def test_only_members_read_or_post(worker):
    alice, alice_token = await amake_user("alice")
    bob, _ = await amake_user("bob")
    _, eve_token = await amake_user("eve")
    dm = await database_sync_to_async(open_dm)(alice, "bob")
    private = await database_sync_to_async(create_group)(alice, "secret", True)
    public = await database_sync_to_async(create_group)(bob, "open", False)
    eve = await connect(eve_token)

    for room in (dm.pk, private.pk):
        await eve.send({"type": "join", "room": room})
        await eve.error("forbidden")
        await eve.send({"type": "history", "room": room})
        await eve.error("forbidden")
    await eve.send({"type": "join", "room": 987654})
    await eve.error("not_found")
    await eve.send({"type": "send", "room": dm.pk, "body": "let me in", "client_msg_id": "e-1"})
    await eve.error("not_joined")
    await eve.send({"type": "typing", "room": private.pk})
    await eve.error("not_joined")
    assert await database_sync_to_async(Message.objects.count)() == 0

    joined = await eve.join(public.pk)
    assert joined["info"]["name"] == "open"
    assert await database_sync_to_async(Membership.objects.filter(room=public, user__username="eve").exists)()
    await eve.close()

    a = await connect(alice_token)
    assert (await a.join(dm.pk))["info"]["peer"]["username"] == "bob"
    await a.close()


async def test_membership_is_checked_again_when_storing(worker):
    alice, token = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    a = await connect(token)
    await a.join(room.pk)
    await database_sync_to_async(Membership.objects.filter(room=room, user=alice).delete)()
    await a.send({"type": "send", "room": room.pk, "body": "removed meanwhile", "client_msg_id": "r-1"})
    error = await a.error("forbidden")
    assert error["ref"] == "r-1"
    assert await database_sync_to_async(Message.objects.count)() == 0
    await a.close()


async def test_resume_after_reconnect_replays_missed_messages_in_order(worker):
    alice, alice_token = await amake_user("alice")
    _, bob_token = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    await database_sync_to_async(Membership.objects.create)(room=room, user_id=(alice.pk + 1))
    a, b = await connect(alice_token), await connect(bob_token)
    await a.join(room.pk)
    await b.join(room.pk)
    for n in range(2):
        await a.send({"type": "send", "room": room.pk, "body": f"m{n}", "client_msg_id": f"m{n}"})
        await b.expect("message", seq=n + 1)
    await b.close()

    for n in range(2, 7):
        await a.send({"type": "send", "room": room.pk, "body": f"m{n}", "client_msg_id": f"m{n}"})
        await a.expect("ack", client_msg_id=f"m{n}")

    b = await connect(bob_token)
    await b.send({"type": "resume", "rooms": {str(room.pk): 2}})
    joined = await b.expect("joined", room=room.pk)
    assert joined["info"]["last_seq"] == 7
    resumed = await b.expect("resumed", room=room.pk)
    assert resumed["last_seq"] == 7
    assert b.seqs(room.pk) == [3, 4, 5, 6, 7]
    assert [f["body"] for f in b.frames if f["type"] == "message"] == ["m2", "m3", "m4", "m5", "m6"]
    # ...and the resumed connection is live again.
    await a.send({"type": "send", "room": room.pk, "body": "live", "client_msg_id": "live"})
    assert (await b.expect("message"))["seq"] == 8
    await a.close()
    await b.close()


async def test_resume_too_far_behind_asks_for_a_reload(worker, monkeypatch, settings):
    import dataclasses

    from chat import consumers

    monkeypatch.setattr(consumers, "CONFIG", dataclasses.replace(consumers.CONFIG, resume_max=3))
    alice, token = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    items = [{"room": room.pk, "sender": alice.pk, "body": f"{n}", "client_msg_id": f"x{n}"} for n in range(10)]
    await database_sync_to_async(store_batch)(items)
    a = await connect(token)
    await a.send({"type": "resume", "rooms": {str(room.pk): 0}})
    reload = await a.expect("reload", room=room.pk)
    assert reload["last_seq"] == 10
    assert a.seqs(room.pk) == []
    await a.close()


async def test_a_lost_publish_is_repaired_from_the_database():
    """Pub/sub is at-most-once: a message stored but never published must still arrive, in order."""
    alice, token = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    a = await connect(token)
    await a.join(room.pk)
    items = [{"room": room.pk, "sender": alice.pk, "body": f"b{n}", "client_msg_id": f"g{n}"} for n in range(3)]
    outcomes = await database_sync_to_async(store_batch)(items)
    # Seqs 1 and 2 are "lost"; only seq 3 reaches the bus.
    await fanout.publish(room.pk, 3, dumps(outcomes[2].frame))
    await a.expect("message", seq=3)
    assert a.seqs(room.pk) == [1, 2, 3]
    # A duplicate publish of an old seq is not shown twice.
    await fanout.publish(room.pk, 2, dumps(outcomes[1].frame))
    await a.send({"type": "ping"})
    await a.expect("pong")
    assert a.seqs(room.pk) == [1, 2, 3]
    await a.close()


async def test_a_crowded_room_lists_some_of_its_online_users_and_announces_no_arrivals(monkeypatch):
    # PARLEY_PRESENCE_MAX = 2: the third user online makes the room crowded.
    # No batching window: carol's arrival, were it announced, would reach alice before her typing.
    crowded = dataclasses.replace(presence.CONFIG, presence_max=2, presence_batch_seconds=0.0)
    monkeypatch.setattr(presence, "CONFIG", crowded)
    monkeypatch.setattr(consumers, "CONFIG", crowded)
    users = [await amake_user(name) for name in ("alice", "bob", "carol")]
    room = await database_sync_to_async(create_group)(users[0][0], "stage", False)
    a, b, c = [await connect(token) for _, token in users]
    assert (await a.join(room.pk))["online_count"] == 1
    joined = await b.join(room.pk)
    assert (len(joined["online"]), joined["online_count"]) == (2, 2)
    while {"id": users[1][0].pk, "username": "bob"} not in (await a.expect("presence", status="online"))["users"]:
        pass  # alice's own arrival, announced apart

    joined = await c.join(room.pk)
    # Two listed (the first by id), three counted.
    assert [u["username"] for u in joined["online"]] == ["alice", "bob"] and joined["online_count"] == 3
    await c.send({"type": "typing", "room": room.pk})
    await a.expect("typing")  # published after carol's arrival would have been
    assert not [f for f in a.frames if f["type"] == "presence" and "carol" in {u["username"] for u in f["users"]}]
    await c.close()
    await b.send({"type": "typing", "room": room.pk})
    await a.expect("typing", user={"id": users[1][0].pk, "username": "bob"})
    assert not [f for f in a.frames if f["type"] == "presence" and f["status"] == "offline"]
    await a.close()
    await b.close()


async def test_history_pages_backwards(worker):
    alice, token = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    items = [{"room": room.pk, "sender": alice.pk, "body": f"h{n}", "client_msg_id": f"h{n}"} for n in range(25)]
    await database_sync_to_async(store_batch)(items)
    a = await connect(token)
    await a.send({"type": "history", "room": room.pk, "limit": 10})
    page = await a.expect("history")
    assert [m["seq"] for m in page["messages"]] == list(range(16, 26)) and page["has_more"]
    await a.send({"type": "history", "room": room.pk, "before_seq": 6, "limit": 10})
    page = await a.expect("history")
    assert [m["seq"] for m in page["messages"]] == [1, 2, 3, 4, 5] and not page["has_more"]
    await a.close()


async def alice_then_bob_in_a_room() -> tuple[Any, Any, str, Room, Client, Client]:
    """Alice joins her public group, then Bob: (alice, bob, bob's token, room, a, b)."""
    alice, alice_token = await amake_user("alice")
    bob, bob_token = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    a = await connect(alice_token)
    await a.join(room.pk)
    b = await connect(bob_token)
    await b.join(room.pk)
    return alice, bob, bob_token, room, a, b


async def test_typing_read_and_presence_reach_other_members(worker, monkeypatch):
    monkeypatch.setattr(presence, "CONFIG", dataclasses.replace(presence.CONFIG, presence_grace_seconds=0.3))
    alice, bob, _, room, a, b = await alice_then_bob_in_a_room()
    joined = next(f for f in b.frames if f["type"] == "joined")
    assert joined["online"] == [{"id": alice.pk, "username": "alice"}, {"id": bob.pk, "username": "bob"}]
    # Alice's own arrival and Bob's came within one batching window: one frame may list both.
    online = await a.expect("presence", status="online")
    while {"id": bob.pk, "username": "bob"} not in online["users"]:
        online = await a.expect("presence", status="online")
    assert online["room"] == room.pk

    await a.send({"type": "typing", "room": room.pk})
    typing = await b.expect("typing")
    assert typing["user"]["username"] == "alice"

    await a.send({"type": "send", "room": room.pk, "body": "read me", "client_msg_id": "rm"})
    await b.expect("message", seq=1)
    await b.send({"type": "read", "room": room.pk, "seq": 99})
    read = await a.expect("read")
    assert read["seq"] == 1 and read["user"]["username"] == "bob"  # clamped to the last message
    assert await database_sync_to_async(
        lambda: Membership.objects.get(room=room, user=bob).last_read_seq)() == 1

    await b.close()
    offline = await a.expect("presence", status="offline")  # after the grace period
    assert offline["users"] == [{"id": bob.pk, "username": "bob"}]
    await a.close()


async def test_a_user_who_comes_back_within_the_grace_period_costs_the_room_no_presence_frame(monkeypatch):
    monkeypatch.setattr(presence, "CONFIG", dataclasses.replace(presence.CONFIG, presence_grace_seconds=0.5))
    _, bob, bob_token, room, a, b = await alice_then_bob_in_a_room()
    await a.expect("presence", status="online")
    await b.close()  # a dropped connection (or a drained pod) ...
    b = await connect(bob_token)  # ... and the client back at once, resuming
    await b.send({"type": "resume", "rooms": {str(room.pk): 0}})
    await b.expect("resumed")
    await asyncio.sleep(1.0)  # past the grace period
    await b.send({"type": "typing", "room": room.pk})
    await a.expect("typing")
    # Bob's first arrival only: no offline, and no second online.
    assert [f["status"] for f in a.frames
            if f["type"] == "presence" and bob.pk in {u["id"] for u in f["users"]}] == ["online"]
    # Bob still counts as online for whoever joins now.
    _, carol_token = await amake_user("carol")
    c = await connect(carol_token)
    assert {u["username"] for u in (await c.join(room.pk))["online"]} == {"alice", "bob", "carol"}
    for client in (a, b, c):
        await client.close()


async def test_full_worker_channel_answers_busy_and_stores_nothing(monkeypatch):
    alice, token = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    layer = get_channel_layer()
    monkeypatch.setattr(layer, "channel_capacity", [(re.compile(r"^chat\.persist$"), 1)])
    a = await connect(token)
    await a.join(room.pk)
    await a.send({"type": "send", "room": room.pk, "body": "first", "client_msg_id": "f-1"})
    await a.send({"type": "send", "room": room.pk, "body": "second", "client_msg_id": "f-2"})
    busy = await a.error("busy")
    assert busy["ref"] == "f-2"
    await a.close()


async def test_bot_answers_from_templates_through_the_bot_worker(worker):
    from django.core.management import call_command

    await database_sync_to_async(call_command)("seed_demo")
    _, token = await amake_user("carol")
    carol = await connect(token)
    room = await database_sync_to_async(lambda: open_dm(
        __import__("django.contrib.auth", fromlist=["get_user_model"]).get_user_model().objects.get(username="carol"),
        "helpbot"))()
    assert room.kind == Room.Kind.BOT
    await carol.join(room.pk)
    await carol.send({"type": "send", "room": room.pk, "body": "hello there", "client_msg_id": "b-1"})
    reply = await carol.expect("message", seq=2)
    assert reply["kind"] == "bot" and reply["sender"]["username"] == "helpbot"
    assert "carol" in reply["body"]
    await carol.send({"type": "send", "room": room.pk, "body": "my name is Carla", "client_msg_id": "b-2"})
    reply = await carol.expect("message", seq=4)
    assert reply["body"].startswith("Nice to meet you, Carla")
    await carol.close()
