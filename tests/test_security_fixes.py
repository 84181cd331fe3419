"""Regression tests of issue 9: each one names the hole it keeps closed (all open at a7b58dd).

In-process tests (Channels' communicators on the real ASGI application, real Redis and
database); the attacks against real server processes are in `test_attacks_live.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis
from channels.db import database_sync_to_async
from channels.testing import HttpCommunicator

from chat import consumers, contract, fanout, process, protocol, services
from chat.models import Membership, Message
from chat.presence import PRESENCE
from chat.process import STATE
from chat.protocol import ProtocolError, parse
from chat.services import create_group, open_dm, store_batch
from parley import config, proxies
from parley.asgi import application
from tests.helpers import amake_user, record_statements
from tests.test_protocol import Client, connect

pytestmark = pytest.mark.django_db(transaction=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def http(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None,
               client: tuple[str, int] = ("203.0.113.9", 40000)) -> tuple[int, bytes]:
    communicator = HttpCommunicator(application, method, path, headers=headers or [])
    communicator.scope["client"] = client
    response = await communicator.get_response(timeout=10)
    return response["status"], response["body"]


# --- 1. drain by header spoofing ------------------------------------------------------------------


async def test_drain_is_not_an_http_route_even_from_loopback_with_forged_headers():
    for client in (("127.0.0.1", 5555), ("203.0.113.9", 5555)):
        status, _ = await http("POST", "/internal/drain", [(b"host", b"localhost"),
                                                           (b"x-forwarded-for", b"127.0.0.1")], client)
        assert status == 404
    assert STATE.draining is False


def _scope(peer: str, forwarded: str | None, proto: str | None = None) -> dict:
    headers = []
    if forwarded is not None:
        headers.append((b"x-forwarded-for", forwarded.encode()))
    if proto is not None:
        headers.append((b"x-forwarded-proto", proto.encode()))
    return {"type": "http", "client": (peer, 1234), "headers": headers, "scheme": "http"}


def test_forwarded_for_is_ignored_from_untrusted_peers(monkeypatch):
    monkeypatch.setattr(proxies, "CONFIG", dataclasses.replace(proxies.CONFIG, trusted_proxies=["10.0.0.0/8"]))
    proxies.trusted_networks.cache_clear()
    try:
        scope = _scope("203.0.113.9", "127.0.0.1", "https")
        proxies.apply(scope)
        assert scope["client"][0] == "203.0.113.9" and scope["scheme"] == "http"
    finally:
        proxies.trusted_networks.cache_clear()


def test_forwarded_for_from_a_trusted_proxy_yields_the_rightmost_untrusted_hop(monkeypatch):
    monkeypatch.setattr(proxies, "CONFIG", dataclasses.replace(proxies.CONFIG, trusted_proxies=["10.0.0.0/8"]))
    proxies.trusted_networks.cache_clear()
    try:
        # The client forged "127.0.0.1" in front; the ingress appended what it saw.
        scope = _scope("10.1.2.3", "127.0.0.1, 198.51.100.7, 10.4.4.4", "https")
        proxies.apply(scope)
        assert scope["client"][0] == "198.51.100.7" and scope["scheme"] == "https"
    finally:
        proxies.trusted_networks.cache_clear()


def test_no_proxy_is_trusted_by_default():
    proxies.trusted_networks.cache_clear()
    scope = _scope("127.0.0.1", "198.51.100.7")
    proxies.apply(scope)
    assert scope["client"][0] == "127.0.0.1"


def test_servers_no_longer_take_proxy_headers_themselves():
    with open(os.path.join(REPO, "bin", "parley")) as launcher:
        text = launcher.read()
    assert "--proxy-headers" not in text.replace("--no-proxy-headers", "")


def test_a_drain_that_outlives_its_window_reports_the_process_not_live(monkeypatch):
    from chat import health

    monkeypatch.setattr(STATE, "drain_started", time.time() - process.CONFIG.drain_seconds - 1)
    assert health.liveness()[0] == 503
    monkeypatch.setattr(STATE, "drain_started", None)
    assert health.liveness()[0] == 200


# --- 2. one NUL poisons everyone's batch ----------------------------------------------------------


@pytest.mark.parametrize("body", ["a\x00b", "bell\x07", "esc\x1b[2J", "del\x7f"])
def test_control_characters_in_a_body_are_refused_at_the_socket(body):
    with pytest.raises(ProtocolError) as caught:
        parse(json.dumps({"type": "send", "room": 1, "body": body, "client_msg_id": "c1"}))
    assert caught.value.code == "invalid_frame"


def test_newlines_and_tabs_in_a_body_are_kept():
    frame = parse(json.dumps({"type": "send", "room": 1, "body": "a\n\tb", "client_msg_id": "c1"}))
    assert frame["body"] == "a\n\tb"


@pytest.mark.postgres
async def test_a_poison_message_in_a_batch_fails_alone():
    """A NUL that got past the socket (an old client, another writer) costs nobody else."""
    alice, _ = await amake_user("alice")
    bob, _ = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    await database_sync_to_async(Membership.objects.create)(room=room, user=bob)
    items = [
        {"room": room.pk, "sender": alice.pk, "body": "fine 1", "client_msg_id": "a1"},
        {"room": room.pk, "sender": bob.pk, "body": "poison\x00", "client_msg_id": "b1"},
        {"room": room.pk, "sender": alice.pk, "body": "fine 2", "client_msg_id": "a2"},
    ]
    outcomes = await database_sync_to_async(store_batch)(items)
    by_id = {o.item["client_msg_id"]: o for o in outcomes}
    assert by_id["a1"].status == "stored" and by_id["a2"].status == "stored"
    assert by_id["b1"].status == "error" and by_id["b1"].code == "invalid_frame"
    seqs = await database_sync_to_async(lambda: list(Message.objects.filter(room=room).values_list("seq", flat=True)))()
    assert sorted(seqs) == [1, 2]  # no gap for the refused one


async def test_http_string_fields_refuse_control_characters():
    _, token = await amake_user("alice")
    communicator = HttpCommunicator(
        application, "POST", "/api/rooms", body=json.dumps({"name": "evil\x00room"}).encode(),
        headers=[(b"host", b"localhost"), (b"authorization", f"Bearer {token}".encode()),
                 (b"content-type", b"application/json")],
    )
    response = await communicator.get_response(timeout=10)
    assert response["status"] == 400 and b"control characters" in response["body"]


async def test_malformed_persist_payloads_are_dropped_without_failing_the_batch(worker):
    from channels.layers import get_channel_layer

    alice, token = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    a = await connect(token)
    await a.join(room.pk)
    await get_channel_layer().send("chat.persist", {"type": "persist.message", "room": "x", "sender": None})
    await a.send({"type": "send", "room": room.pk, "body": "still works", "client_msg_id": "ok-1"})
    assert (await a.expect("ack", timeout=10))["seq"] == 1
    await a.close()


# --- 3. origins under a wildcard host ---------------------------------------------------------------


def test_a_wildcard_host_never_becomes_an_allowed_origin():
    cfg = dataclasses.replace(config.CONFIG, allowed_hosts=["*"], allowed_origins=[])
    assert cfg.origins == []
    cfg = dataclasses.replace(config.CONFIG, allowed_hosts=["chat.example.com", "*", ".example.org"],
                              allowed_origins=[])
    assert cfg.origins == ["chat.example.com", ".example.org"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_answer_whatever_the_host_header(path):
    # Kubelet probes carry the pod IP as Host; ALLOWED_HOSTS here is localhost only.
    status, body = await http("GET", path, [(b"host", b"10.244.1.17:8000")])
    assert status == 200, body
    assert json.loads(body)["status"] == "ok"


async def test_readiness_says_error_without_the_exception_text(monkeypatch):
    from chat import health

    broken = aioredis.Redis.from_url("redis://:hunter2@127.0.0.1:1/0", socket_connect_timeout=1)
    monkeypatch.setattr(health, "clients", lambda: [broken])
    status, body = await http("GET", "/readyz", [(b"host", b"10.244.1.17:8000")])
    assert status == 503
    assert json.loads(body)["checks"]["redis0"] == "error"
    assert b"hunter2" not in body and b"Error" not in body and b"refused" not in body


async def test_metrics_are_not_served_on_the_public_listener():
    status, _ = await http("GET", "/metrics", [(b"host", b"localhost")])
    assert status == 404


def test_parley_refuses_to_start_with_the_development_secret_key():
    env = {k: v for k, v in os.environ.items() if k not in ("PARLEY_DEV", "SECRET_KEY")}
    env["PYTHON"] = sys.executable
    result = subprocess.run([os.path.join(REPO, "bin", "parley"), "manage", "check"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


# --- 4 and 11. bounded outbox and bounded frames ----------------------------------------------------


async def test_queued_bytes_not_only_frames_close_a_slow_client(monkeypatch):
    monkeypatch.setattr(consumers, "CONFIG", dataclasses.replace(consumers.CONFIG, send_buffer_bytes=20_000))
    alice, token = await amake_user("alice")
    a = await connect(token)
    [conn] = STATE.of_user(alice.pk)
    # A stalled client: the writer never finishes a send.
    stalled = asyncio.Event()
    original = conn.base_send

    async def blocking(message):
        if message["type"] == "websocket.send":
            await stalled.wait()
        await original(message)

    conn.base_send = blocking
    for _ in range(5):
        conn.push_text("x" * 5_000)  # 5 frames, 25 KB: over the byte bound, far under 1,000 frames
    assert conn.closing
    close = await a.comm.receive_output(5)
    assert close == {"type": "websocket.close", "code": 4008}


async def test_history_pages_are_split_by_bytes_and_say_has_more(worker, monkeypatch):
    monkeypatch.setattr(consumers, "CONFIG", dataclasses.replace(consumers.CONFIG, max_frame_bytes=40_000))
    alice, token = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "big", False)
    body = "\x01" * 4000  # 6 bytes of JSON per character: ~24 KB per message
    items = [{"room": room.pk, "sender": alice.pk, "body": f"{n}", "client_msg_id": f"h{n}"} for n in range(10)]
    await database_sync_to_async(store_batch)(items)
    await database_sync_to_async(lambda: Message.objects.filter(room=room).update(body=body))()
    a = await connect(token)
    await a.send({"type": "history", "room": room.pk, "limit": 10})
    raw = await a.comm.receive_from(10)
    page = json.loads(raw)
    assert page["type"] == "history" and page["has_more"] is True
    assert len(raw.encode()) <= 40_000
    assert [m["seq"] for m in page["messages"]] == [10]  # the newest that fit
    await a.close()


async def test_a_failed_write_on_an_open_socket_closes_it_with_4011(caplog):
    alice, token = await amake_user("alice")
    a = await connect(token)
    [conn] = STATE.of_user(alice.pk)
    original = conn.base_send

    async def refusing(message):
        if message["type"] == "websocket.send":
            raise ValueError("frame refused by the server")
        await original(message)

    conn.base_send = refusing
    with caplog.at_level(logging.WARNING, logger="chat.consumers"):
        await a.send({"type": "ping"})
        close = await a.comm.receive_output(5)
    assert close == {"type": "websocket.close", "code": 4011}
    assert any("closing with 4011" in r.getMessage() for r in caplog.records)


# --- 6. set-based join and resume, caps -------------------------------------------------------------


class QueryCounter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute, sql, params, many, context):
        self.count += 1
        return execute(sql, params, many, context)


async def test_resume_of_many_rooms_costs_a_fixed_number_of_queries(monkeypatch):
    alice, token = await amake_user("alice")
    rooms = [await database_sync_to_async(create_group)(alice, f"r{n}", False) for n in range(40)]
    statements: list[str] = []
    a = await connect(token)
    # Both read paths: the ORM's (SQLite) and the async statements of `chat.reads_pg`.
    record_statements(monkeypatch, statements.append)
    await a.send({"type": "resume", "rooms": {str(r.pk): 0 for r in rooms}})
    for _ in rooms:
        await a.expect("resumed", timeout=10)
    monkeypatch.undo()
    # join_rooms (rooms, memberships), last seqs, one catch-up: not 3-5 per room as before.
    assert 3 <= len(statements) <= 8, statements
    await a.close()


async def test_a_connection_cannot_join_more_rooms_than_the_cap(monkeypatch):
    monkeypatch.setattr(consumers, "CONFIG", dataclasses.replace(consumers.CONFIG, max_rooms_per_connection=3))
    alice, token = await amake_user("alice")
    rooms = [await database_sync_to_async(create_group)(alice, f"r{n}", False) for n in range(5)]
    a = await connect(token)
    await a.send({"type": "resume", "rooms": {str(r.pk): 0 for r in rooms}})
    refused = [await a.error("too_many_rooms") for _ in range(2)]
    assert {f["room"] for f in refused} == {rooms[3].pk, rooms[4].pk}
    for _ in range(3):
        await a.expect("resumed")
    await a.send({"type": "join", "room": rooms[4].pk})
    assert (await a.error("too_many_rooms"))["room"] == rooms[4].pk
    await a.close()


# --- 7. nothing of a room before its `joined` ------------------------------------------------------


async def test_looping_join_on_a_dm_leaks_no_typing_or_read_markers(worker):
    alice, alice_token = await amake_user("alice")
    await amake_user("bob")
    _, eve_token = await amake_user("eve")
    dm = await database_sync_to_async(open_dm)(alice, "bob")
    a = await connect(alice_token)
    await a.join(dm.pk)
    eve = await connect(eve_token)

    async def attack() -> None:
        for _ in range(40):
            await eve.send({"type": "join", "room": dm.pk})
            await asyncio.sleep(0.005)

    async def chat() -> None:
        for n in range(20):
            await a.send({"type": "typing", "room": dm.pk})
            await a.send({"type": "read", "room": dm.pk, "seq": n})
            await asyncio.sleep(0.01)

    await asyncio.gather(attack(), chat())
    await asyncio.sleep(0.3)
    seen = []
    while not await eve.comm.receive_nothing(0.2):
        seen.append(json.loads(await eve.comm.receive_from()))
    assert seen and all(f["type"] == "error" and f["code"] == "forbidden" for f in seen), seen[:5]
    await a.close()
    await eve.close()


# --- 9. rate limits and robustness -------------------------------------------------------------------


async def test_one_user_cannot_hold_more_sockets_than_the_cap(monkeypatch):
    monkeypatch.setattr(process, "CONFIG", dataclasses.replace(process.CONFIG, max_sockets_per_user=3))
    _, token = await amake_user("alice")
    held = [await connect(token) for _ in range(3)]
    extra = Client(token)
    connected, _ = await extra.comm.connect()
    assert connected
    frame = json.loads(await extra.comm.receive_from(5))
    assert frame["type"] == "error" and frame["code"] == "rate_limited"
    assert await extra.comm.receive_output(5) == {"type": "websocket.close", "code": 4009}
    await held[0].close()
    await asyncio.sleep(0.1)
    again = await connect(token)  # a freed place can be taken again
    for client in [*held[1:], again]:
        await client.close()


async def test_typing_fan_out_is_throttled_per_connection_and_room():
    alice, alice_token = await amake_user("alice")
    _, bob_token = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    a, b = await connect(alice_token), await connect(bob_token)
    await a.join(room.pk)
    await b.join(room.pk)
    for _ in range(30):
        await a.send({"type": "typing", "room": room.pk})
    await asyncio.sleep(0.5)
    typing = 0
    while not await b.comm.receive_nothing(0.2):
        typing += json.loads(await b.comm.receive_from())["type"] == "typing"
    assert typing == 1
    await a.close()
    await b.close()


async def test_a_lone_surrogate_is_a_plain_invalid_frame_not_a_logged_traceback(caplog):
    _, token = await amake_user("alice")
    a = await connect(token)
    with caplog.at_level(logging.ERROR):
        await a.send('{"type":"send","room":1,"body":"\\ud800","client_msg_id":"s1"}')
        await a.error("invalid_frame")
        await a.send('{"type":"ping","ref":"\\udfff"}')
        await a.error("invalid_frame")
        await a.send({"type": "ping", "ref": "after"})
        await a.expect("pong", ref="after")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await a.close()


async def test_frames_after_an_unauthenticated_close_raise_nothing():
    client = Client(None)
    await client.comm.connect()
    await client.comm.receive_from(5)
    for _ in range(3):
        await client.send({"type": "ping"})
    assert (await client.comm.receive_output(5))["code"] == 4001
    await asyncio.sleep(0.1)
    assert not client.comm.future.done() or client.comm.future.exception() is None


# --- 10. Redis keys and payloads ---------------------------------------------------------------------


def test_every_redis_key_carries_the_platform_prefix(monkeypatch):
    other = dataclasses.replace(config.CONFIG, channel_prefix="tenant-b")
    monkeypatch.setattr(contract, "CONFIG", other)
    for name in (contract.room_topic(7), contract.presence_key(7), contract.heartbeat_key("p1"),
                 contract.process_topic("p1"), contract.control_topic()):
        assert name.startswith("tenant-b:"), name
    assert contract.room_of_topic("tenant-b:room:7") == 7
    assert contract.room_of_topic("asgi:room:7") is None


async def test_malformed_pubsub_payloads_are_dropped_and_delivery_goes_on(worker):
    alice, token = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    a = await connect(token)
    await a.join(room.pk)
    bus = fanout.get_bus()
    reconnects = sum(shard.connects for shard in bus.shards)
    client = aioredis.Redis.from_url(os.environ["REDIS_URLS"].split(",")[0])
    for payload in (b"notanumber\n{}", b"-5\n{}", b"\xff\xfe", b"1"):
        await client.publish(contract.room_topic(room.pk), payload)
    await client.publish(bus.control_topic, b"key-not-int\n{}")
    await client.publish(contract.control_topic(), b"[not, json")
    await client.aclose()
    await a.send({"type": "send", "room": room.pk, "body": "after garbage", "client_msg_id": "g1"})
    message = await a.expect("message", timeout=10)
    assert message["body"] == "after garbage" and message["seq"] == 1
    assert bus.bad_payloads >= 5
    assert sum(shard.connects for shard in bus.shards) == reconnects  # no forced resubscribe
    await a.close()


async def test_revocation_command_closes_the_users_sockets_within_seconds():
    alice, token = await amake_user("alice")
    a = await connect(token)
    client = aioredis.Redis.from_url(os.environ["REDIS_URLS"].split(",")[0])
    await client.publish(contract.control_topic(), json.dumps({"kick_user": alice.pk}))
    await client.aclose()
    frame = await a.error("forbidden", timeout=5)
    assert "revoked" in frame["message"]
    assert await a.comm.receive_output(5) == {"type": "websocket.close", "code": 4001}


# --- also: ids, per-process state ----------------------------------------------------------------------


async def test_reusing_a_client_msg_id_in_another_room_is_refused_not_acked_as_the_old_message(worker):
    alice, token = await amake_user("alice")
    first = await database_sync_to_async(create_group)(alice, "one", False)
    second = await database_sync_to_async(create_group)(alice, "two", False)
    a = await connect(token)
    await a.join(first.pk)
    await a.join(second.pk)
    await a.send({"type": "send", "room": first.pk, "body": "hi", "client_msg_id": "same"})
    assert (await a.expect("ack"))["room"] == first.pk
    await a.send({"type": "send", "room": second.pk, "body": "hi there", "client_msg_id": "same"})
    refused = await a.error("conflict", timeout=10)
    assert refused["room"] == second.pk
    count = await database_sync_to_async(Message.objects.filter(room=second).count)()
    assert count == 0
    await a.close()


async def test_deactivated_users_queued_sends_are_refused_by_the_worker():
    alice, _ = await amake_user("alice")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    alice.is_active = False
    await database_sync_to_async(alice.save)()
    [outcome] = await database_sync_to_async(store_batch)(
        [{"room": room.pk, "sender": alice.pk, "body": "late", "client_msg_id": "z1"}])
    assert outcome.status == "error" and outcome.code == "forbidden"


def test_presence_forgets_usernames_of_users_who_left():
    PRESENCE.arrive(991, 4242, "transient")
    PRESENCE.arrive(992, 4242, "transient")
    PRESENCE.depart(991, 4242)
    assert PRESENCE.names.get(4242) == "transient"
    PRESENCE.depart(992, 4242)
    assert 4242 not in PRESENCE.names
    assert PRESENCE.depart(992, 4242) is False  # an extra depart does not go negative


async def test_a_failed_subscribe_leaves_no_topic_behind(monkeypatch):
    bus = fanout.RoomBus("test-proc")
    bus.start()
    shard = bus.shards[0]
    shard.connected.clear()
    monkeypatch.setattr(fanout, "SUBSCRIBE_TIMEOUT", 0.1)
    shard.task.cancel()

    class Member:
        def deliver(self, *a): ...
        def resync(self, *a): ...
        def push_text(self, *a): ...

    with pytest.raises(fanout.BusUnavailable):
        await bus.join(123, Member())
    assert contract.room_topic(123) not in shard.topics
    await bus.close()


def test_join_rooms_answers_each_room(db):
    from django.contrib.auth import get_user_model

    users = get_user_model().objects
    alice = users.create_user("alice", password="x-password-1")
    bob = users.create_user("bob", password="x-password-1")
    public = create_group(alice, "pub", False)
    private = create_group(alice, "priv", True)
    dm = open_dm(alice, "bob")
    answers = services.join_rooms(bob.pk, [public.pk, private.pk, dm.pk, 999999])
    assert answers[public.pk]["name"] == "pub"
    assert isinstance(answers[private.pk], ProtocolError) and answers[private.pk].code == "forbidden"
    assert answers[dm.pk]["peer"] == {"id": alice.pk, "username": "alice"}
    assert answers[999999].code == "not_found"
    assert Membership.objects.filter(room=public, user=bob).exists()


def test_protocol_error_codes_are_documented():
    text = open(os.path.join(REPO, "docs", "protocol.md")).read()
    for code in protocol.ErrorCode:
        assert f"`{code}`" in text, code
    for name, value in vars(protocol.CloseCode).items():
        if name.isupper():
            assert f"| {value} |" in text, (name, value)


async def _api(method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    communicator = HttpCommunicator(
        application, method, path, body=json.dumps(body or {}).encode(),
        headers=[(b"host", b"localhost"), (b"authorization", f"Bearer {token}".encode()),
                 (b"content-type", b"application/json")],
    )
    response = await communicator.get_response(timeout=10)
    return response["status"], json.loads(response["body"] or b"{}")


async def test_a_member_can_leave_a_group_and_its_live_sockets_stop_receiving_it(worker):
    alice, alice_token = await amake_user("alice")
    bob, bob_token = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "team", True)
    await database_sync_to_async(Membership.objects.create)(room=room, user=bob)
    a, b = await connect(alice_token), await connect(bob_token)
    await a.join(room.pk)
    await b.join(room.pk)
    status, _ = await _api("POST", f"/api/rooms/{room.pk}/leave", bob_token)
    assert status == 200
    left = await b.expect("left", room=room.pk, timeout=5)
    assert left["reason"] == "membership ended"
    await a.send({"type": "send", "room": room.pk, "body": "after bob left", "client_msg_id": "l1"})
    await a.expect("ack", timeout=10)
    assert await b.comm.receive_nothing(0.5)
    await b.send({"type": "send", "room": room.pk, "body": "me again", "client_msg_id": "l2"})
    await b.error("not_joined")
    await b.send({"type": "join", "room": room.pk})  # private: no way back without an invitation
    await b.error("forbidden")
    await a.close()
    await b.close()


async def test_only_the_creator_removes_members_and_dms_cannot_be_left():
    alice, alice_token = await amake_user("alice")
    bob, bob_token = await amake_user("bob")
    carol, _ = await amake_user("carol")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    for user in (bob, carol):
        await database_sync_to_async(Membership.objects.create)(room=room, user=user)
    status, body = await _api("DELETE", f"/api/rooms/{room.pk}/members/carol", bob_token)
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, _ = await _api("DELETE", f"/api/rooms/{room.pk}/members/carol", alice_token)
    assert status == 200
    assert not await database_sync_to_async(Membership.objects.filter(room=room, user=carol).exists)()
    dm = await database_sync_to_async(open_dm)(alice, "bob")
    status, body = await _api("POST", f"/api/rooms/{dm.pk}/leave", bob_token)
    assert status == 403


async def test_daphne_stops_reading_a_socket_whose_frames_pile_up():
    """Item 5: a client that sends faster than it is handled is paused by TCP, not buffered."""
    from parley.daphne_server import ApplicationInbox

    class Transport:
        paused = False

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False

    class Protocol:
        failed: int | None = None

        def __init__(self) -> None:
            self.transport = Transport()

        def _fail_connection(self, code: int, reason: str) -> None:
            self.failed = code

    protocol = Protocol()
    transport = protocol.transport
    inbox = ApplicationInbox(protocol, limit=8)
    for n in range(7):
        inbox.put_nowait({"type": "websocket.receive", "text": str(n)})
    assert not transport.paused
    inbox.put_nowait({"type": "websocket.receive", "text": "7"})
    assert transport.paused
    for _ in range(3):
        await inbox.get()
    assert transport.paused  # 5 still waiting: above half
    await inbox.get()
    assert not transport.paused
    assert [(await inbox.get())["text"] for _ in range(4)] == ["4", "5", "6", "7"]  # nothing lost
    assert protocol.failed is None
    # Frames already read keep coming while reading is paused: a client that keeps the inbox at
    # four times its bound is flooding and is cut off (1008)...
    for n in range(32):
        inbox.put_nowait({"type": "websocket.receive", "text": str(n)})
    assert transport.paused and protocol.failed == 1008
    # ...through the autobahn method of that name, present at the pinned version.
    from autobahn.websocket.protocol import WebSocketProtocol

    assert callable(WebSocketProtocol._fail_connection)


def test_the_servers_read_frames_only_up_to_the_protocols_own_limit():
    from parley.daphne_server import LeanServer

    server = LeanServer(application=None, endpoints=["tcp:port=0:interface=127.0.0.1"])
    assert server.websocket_max_message_size == config.CONFIG.ws_max_bytes <= 128 * 1024
    assert protocol.max_frame_chars() < config.CONFIG.ws_max_bytes


async def test_read_markers_inside_the_interval_are_coalesced_not_lost():
    alice, alice_token = await amake_user("alice")
    _, bob_token = await amake_user("bob")
    room = await database_sync_to_async(create_group)(alice, "team", False)
    items = [{"room": room.pk, "sender": alice.pk, "body": f"{n}", "client_msg_id": f"r{n}"} for n in range(3)]
    await database_sync_to_async(store_batch)(items)
    a, b = await connect(alice_token), await connect(bob_token)
    await a.join(room.pk)
    await b.join(room.pk)
    for seq in (1, 2, 3):
        await a.send({"type": "read", "room": room.pk, "seq": seq})
    seen = [await b.expect("read", timeout=3) for _ in range(2)]
    assert [f["seq"] for f in seen] == [1, 3]  # the first at once, the latest after the interval
    assert await b.comm.receive_nothing(0.8)
    await a.close()
    await b.close()


def test_uvicorn_handshake_log_lines_carry_no_token():
    """uvicorn logs `"WebSocket /ws/?token=..." [accepted]` at INFO; the filter blanks the token,
    and stays in place through uvicorn's logging configuration."""
    import logging.config

    import uvicorn.config

    from parley.uvicorn_server import RedactTokens

    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    logger = logging.getLogger("uvicorn.error")
    redact, lines = RedactTokens(), Lines()
    logger.addFilter(redact)
    try:
        logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)
        logger.addHandler(lines)
        logger.info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", "/ws/?token=s3cret-Token_value&x=1")
        assert lines.lines == ['127.0.0.1:5000 - "WebSocket /ws/?token=[redacted]&x=1" [accepted]']
    finally:
        logger.removeFilter(redact)
        logger.removeHandler(lines)
