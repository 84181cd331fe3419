"""Attack suite, authorization matrix: every client frame and every HTTP endpoint, for every kind
of actor and every kind of room, generated from the table of documented answers below.

Issue 9, "The attack suite", second bullet. Each cell asserts the answer docs/protocol.md
documents AND, for an actor who is not (or not yet) a member, that nothing of the room reaches it:
after the attempt, members of the room type, send a message, move a read marker and arrive, while
the attacker repeats its attempt (looping `join` on a DM is issue 9 item 7), and the attacker's
socket must get no `message`, `typing`, `read`, `presence`, `joined`, `history`, ... of the room.

Actors, for a target room whose members are alice and bob (alice and the bot for a bot chat):
- member: alice.
- non_member: carol, a colleague: she shares other rooms with alice (a public group, a DM) and
  knows the target room's id, but is not in the target room.
- outsider: eve, a valid token and no rooms at all. (The brief: "not in the room and the room is
  not joinable"; a public group is joinable by any authenticated user, documented, so there both
  non-members simply join.)
- no_token: no credentials at all.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client as HttpClient
from django.urls import URLPattern, get_resolver

from chat import fanout
from chat.models import Bot, Membership, Message
from chat.protocol import CLIENT_TYPES, dumps
from chat.services import create_group, open_dm, store_batch
from parley.asgi import application
from tests.helpers import make_user

KINDS = ("public_group", "private_group", "dm", "bot_chat")
ACTORS = ("member", "non_member", "outsider", "no_token")
NON_MEMBERS = ("non_member", "outsider")
ANY = None  # a rule that matches every value of its column

# --- the documented answers: WebSocket ------------------------------------------------------------
#
# A cell's answer is the sequence of answer frames its procedure gets: "joined", "error:forbidden",
# "close:4001", ... Procedures: `send`, `typing` and `read` "need a prior `join` on this
# connection" (docs/protocol.md, client table), so their cell sends `join` first, as a client
# would, then the frame; every other frame is sent on its own.


@dataclass(frozen=True)
class Rule:
    frames: frozenset[str] | None
    actors: frozenset[str] | None
    kinds: frozenset[str] | None
    answer: tuple[str, ...]
    why: str

    def matches(self, frame: str, actor: str, kind: str) -> bool:
        return all(c is None or v in c for c, v in ((self.frames, frame), (self.actors, actor), (self.kinds, kind)))


def rule(frames: Any, actors: Any, kinds: Any, answer: tuple[str, ...], why: str) -> Rule:
    def norm(value: Any) -> frozenset[str] | None:
        return None if value is ANY else frozenset([value] if isinstance(value, str) else value)

    return Rule(norm(frames), norm(actors), norm(kinds), answer, why)


JOINABLE = ("public_group",)
INVITE_ONLY = ("private_group", "dm", "bot_chat")

SOCKET_RULES = [  # first match wins
    rule(ANY, "no_token", ANY, ("error:forbidden", "close:4001"),
         "Connecting: 'A socket without valid credentials is accepted, sent error {code: forbidden} and "
         "closed with 4001'; frames it sends afterwards get nothing and raise nothing"),
    rule("ping", ANY, ANY, ("pong",), "Client table: ping -> pong"),
    rule("leave", ANY, ANY, ("left",),
         "Client table: leave -> left; 'Stops this connection's delivery for the room' (nothing to stop "
         "for a room never joined, and `left` carries nothing of the room)"),
    rule("join", "member", ANY, ("joined",), "Client table: join -> joined"),
    rule("join", NON_MEMBERS, JOINABLE, ("joined",), "Client table: 'Public groups make you a member'"),
    rule("join", NON_MEMBERS, INVITE_ONLY, ("error:forbidden",),
         "Client table: 'DMs, bot chats and private groups need membership (an invitation)'; error "
         "codes: forbidden = 'not allowed to join (DM, bot chat, private room)'"),
    rule("send", "member", ANY, ("joined", "ack"), "Client table: send -> 'ack once stored'"),
    rule("send", NON_MEMBERS, JOINABLE, ("joined", "ack"), "join made them a member (public group)"),
    rule("send", NON_MEMBERS, INVITE_ONLY, ("error:forbidden", "error:not_joined"),
         "join refused; error codes: not_joined = 'send/typing/read for a room not joined on this connection'"),
    rule("typing", "member", ANY, ("joined", "typing"), "Client table: typing -> 'typing to the room's members "
                                                        "(you get it too)'"),
    rule("typing", NON_MEMBERS, JOINABLE, ("joined", "typing"), "join made them a member (public group)"),
    rule("typing", NON_MEMBERS, INVITE_ONLY, ("error:forbidden", "error:not_joined"), "as for send"),
    rule("read", "member", ANY, ("joined", "read"), "Client table: read -> 'read to the room's members'"),
    rule("read", NON_MEMBERS, JOINABLE, ("joined", "read"), "join made them a member (public group)"),
    rule("read", NON_MEMBERS, INVITE_ONLY, ("error:forbidden", "error:not_joined"), "as for send"),
    rule("history", "member", ANY, ("history",), "Client table: history -> history; 'no join needed'"),
    rule("history", NON_MEMBERS, ANY, ("error:forbidden",),
         "Client table: history is 'Members only' (a public group's non-member is not one until it joins); "
         "error codes: forbidden = 'not a member'"),
    rule("resume", "member", ANY, ("joined", "resumed"), "Client table: resume -> per room joined, ..., resumed"),
    rule("resume", NON_MEMBERS, JOINABLE, ("joined", "resumed"),
         "resume attaches each room as join does: a public group makes you a member"),
    rule("resume", NON_MEMBERS, INVITE_ONLY, ("error:forbidden",),
         "resume is a join per room: refused like join, with the room id in the error"),
]


def socket_answer(frame: str, actor: str, kind: str) -> Rule:
    return next(r for r in SOCKET_RULES if r.matches(frame, actor, kind))


def becomes_member(frame: str, actor: str, kind: str) -> bool:
    """The cell legitimately makes the actor a member (then the room's frames are its own)."""
    return actor == "member" or (actor in NON_MEMBERS and kind in JOINABLE and frame in ("join", "send", "typing",
                                                                                        "read", "resume"))


SOCKET_CELLS = [(f, a, k) for f in CLIENT_TYPES for a in ACTORS for k in KINDS]

# --- the documented answers: HTTP ---------------------------------------------------------------
#
# docs/protocol.md "HTTP API": errors are {"error": {"code", "message"}} with 400/401/403/404/405/409.
# An answer is (status, error code or None, what the body must show of the target room).
# "listed" / "hidden": the target room's id appears / does not appear anywhere in the body.
# "own_room": a room the actor owns, never the target.

ENDPOINTS = ("GET /api/me", "GET /api/rooms", "POST /api/rooms", "POST /api/rooms/<id>/members",
             "DELETE /api/rooms/<id>/members/<user>", "POST /api/rooms/<id>/leave", "POST /api/dms",
             "GET /api/rooms/<id>/messages", "POST /api/auth/logout", "POST /api/auth/logout-all")
# Endpoints whose successful answer changes the target room's members (by design).
CHANGES_MEMBERS = {("POST /api/rooms/<id>/members", "member"), ("DELETE /api/rooms/<id>/members/<user>", "member"),
                   ("POST /api/rooms/<id>/leave", "member")}


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    code: str | None
    room: str  # "listed" | "hidden" | "any"
    why: str


def http_answer(endpoint: str, actor: str, kind: str) -> HttpAnswer:
    if actor == "no_token":
        # "HTTP API (JSON; token or session auth)": anything without credentials is 401.
        return HttpAnswer(401, "unauthenticated", "hidden", "HTTP API: token or session auth")
    member = actor == "member"
    if endpoint == "GET /api/me":
        return HttpAnswer(200, None, "hidden", "GET /api/me -> {user}: yourself, nothing of any room")
    if endpoint == "GET /api/rooms":
        if member:
            return HttpAnswer(200, None, "listed", "GET /api/rooms -> {rooms: [...]}: your rooms")
        if kind in JOINABLE:
            return HttpAnswer(200, None, "listed", "GET /api/rooms -> public: [joinable public groups]")
        return HttpAnswer(200, None, "hidden", "a private room, DM or bot chat is listed to its members only")
    if endpoint == "POST /api/rooms":
        return HttpAnswer(201, None, "hidden", "POST /api/rooms -> 201 room: a new room, never the target")
    if endpoint == "POST /api/rooms/<id>/members":
        if not member:
            return HttpAnswer(403, "forbidden", "hidden",
                              "invite 'a user to a group you belong to': a non-member may not (not even itself)")
        if kind in ("dm", "bot_chat"):
            return HttpAnswer(403, "forbidden", "hidden", "invitations are to groups only: a DM stays 1:1")
        return HttpAnswer(200, None, "listed", "a member invites to its group")
    if endpoint == "DELETE /api/rooms/<id>/members/<user>":
        # Issue 9 "Also": "Add leave, and remove by the room's creator" (alice created the groups).
        if not member:
            return HttpAnswer(403, "forbidden", "hidden", "only the room's creator removes members")
        if kind in ("dm", "bot_chat"):
            return HttpAnswer(403, "forbidden", "hidden", "nobody is removed from a DM or bot chat")
        return HttpAnswer(200, None, "listed", "the creator removes a member of its group")
    if endpoint == "POST /api/rooms/<id>/leave":
        if not member:
            return HttpAnswer(403, "forbidden", "hidden", "leaving needs a membership (not even a public group's)")
        if kind in ("dm", "bot_chat"):
            return HttpAnswer(403, "forbidden", "hidden", "'DMs and bot chats cannot be left' (chat.services)")
        return HttpAnswer(200, None, "listed", "a member leaves its group")
    if endpoint in ("POST /api/auth/logout", "POST /api/auth/logout-all"):
        return HttpAnswer(200, None, "hidden", "issue 9 item 8: revocation of one token / of all: about no room")
    if endpoint == "POST /api/dms":
        # The DM (or bot chat) "of you and `user`": for a member with the peer, the target room
        # itself; for anyone else a room of their own with that user, never the target.
        if member and kind in ("dm", "bot_chat"):
            return HttpAnswer(200, None, "listed", "POST /api/dms -> the same room every time")
        return HttpAnswer(200, None, "hidden", "POST /api/dms -> the DM of you and `user`: yours, not theirs")
    if endpoint == "GET /api/rooms/<id>/messages":
        if member:
            return HttpAnswer(200, None, "listed", "GET messages -> {room, messages, has_more}")
        return HttpAnswer(403, "forbidden", "hidden", "history is members only (a public group's too, until joined)")
    raise AssertionError(endpoint)


HTTP_CELLS = [(e, a, k) for e in ENDPOINTS for a in ACTORS for k in KINDS]

# --- the world: one target room of each kind ----------------------------------------------------


@dataclass
class World:
    rooms: dict[str, int]
    tokens: dict[str, str]  # alice, bob, carol, eve, helpbot
    users: dict[str, int]
    peers: dict[str, str]  # per kind: the other member (who `POST /api/dms` names)

    def actor_token(self, actor: str) -> str | None:
        return {"member": self.tokens["alice"], "non_member": self.tokens["carol"],
                "outsider": self.tokens["eve"], "no_token": None}[actor]

    def actor_name(self, actor: str) -> str | None:
        return {"member": "alice", "non_member": "carol", "outsider": "eve", "no_token": None}[actor]


def build_world() -> World:
    users: dict[str, Any] = {}
    tokens: dict[str, str] = {}
    for name in ("alice", "bob", "carol", "eve", "helpbot"):
        users[name], tokens[name] = make_user(name)
    Bot.objects.create(user=users["helpbot"], description="answers")
    public = create_group(users["alice"], "lobby", False)
    private = create_group(users["alice"], "secret", True)
    for room in (public, private):
        Membership.objects.get_or_create(room=room, user=users["bob"])
    dm = open_dm(users["alice"], "bob")
    bot = open_dm(users["alice"], "helpbot")
    # carol, the colleague: a room with alice and a DM with her, just not the target rooms.
    watercooler = create_group(users["alice"], "watercooler", False)
    Membership.objects.get_or_create(room=watercooler, user=users["carol"])
    open_dm(users["carol"], "alice")
    rooms = {"public_group": public.pk, "private_group": private.pk, "dm": dm.pk, "bot_chat": bot.pk}
    seed = [
        {"room": pk, "sender": users["alice"].pk, "body": f"seed of {kind}", "client_msg_id": f"seed-{kind}"}
        for kind, pk in rooms.items()
    ]
    store_batch(seed)
    peers = {"public_group": "bob", "private_group": "bob", "dm": "bob", "bot_chat": "helpbot"}
    return World(rooms, tokens, {n: u.pk for n, u in users.items()}, peers)


@pytest.fixture
def fast_passwords(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def world(db: None, fast_passwords: None) -> World:
    return build_world()


@pytest.fixture
async def live_world(worker: Any, fast_passwords: None) -> World:
    return await database_sync_to_async(build_world)()


# --- a socket that records everything ------------------------------------------------------------

_ids = itertools.count(1)


class Socket:
    def __init__(self, token: str | None) -> None:
        self.comm = WebsocketCommunicator(application, f"/ws/?token={token}" if token else "/ws/")
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.closed = False

    async def open(self) -> dict[str, Any] | None:
        connected, _ = await self.comm.connect()
        assert connected
        return await self.next(5)

    async def next(self, timeout: float) -> dict[str, Any] | None:
        if self.close_code is not None:
            return None
        output = await self.comm.receive_output(timeout)  # re-raises what escaped the consumer
        if output["type"] == "websocket.close":
            self.close_code = output.get("code", 1000)
            return None
        frame = json.loads(output["text"])
        self.frames.append(frame)
        return frame

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5) -> dict[str, Any] | None:
        """The first frame matching, or None if the socket closed or `timeout` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                frame = await self.next(left)
            except TimeoutError:
                return None
            if frame is None or predicate(frame):
                return frame
        return None

    async def send(self, frame: dict[str, Any]) -> None:
        await self.comm.send_to(text_data=json.dumps(frame))

    async def barrier(self) -> None:
        """Everything the server queued for this socket before now has been read."""
        ref = f"barrier-{next(_ids)}"
        await self.send({"type": "ping", "ref": ref})
        assert await self.until(lambda f: f["type"] == "pong" and f["ref"] == ref), f"no pong: {self.frames[-5:]}"

    async def shut(self) -> None:
        if not self.closed and not self.comm.future.done():  # a timed-out receive cancels it
            self.closed = True
            try:
                await self.comm.disconnect()
            except Exception:  # cleanup: a failure is reported by the test itself
                pass


def label(frame: dict[str, Any] | None) -> str:
    if frame is None:
        return "nothing"
    return f"error:{frame['code']}" if frame["type"] == "error" else frame["type"]


async def attempt(sock: Socket, frame_type: str, room: int, user_id: int) -> list[str]:
    """Run the cell's procedure (see the table's comment); the labels of the answers it got."""
    labels: list[str] = []

    def answer_to(types: tuple[str, ...], ref: str | None = None) -> Callable[[dict[str, Any]], bool]:
        def match(f: dict[str, Any]) -> bool:
            if f["type"] == "error":
                return ref is None or f.get("ref") == ref
            if f["type"] in ("typing", "read"):
                return f["type"] in types and f["room"] == room and f["user"]["id"] == user_id
            return f["type"] in types and f.get("room", room) == room and (ref is None or f.get("ref", ref) == ref)
        return match

    async def step(frame: dict[str, Any], types: tuple[str, ...], ref: str) -> dict[str, Any] | None:
        await sock.send({**frame, "ref": ref})
        got = await sock.until(answer_to(types, ref if "ack" not in types else None))
        labels.append(label(got))
        return got

    n = next(_ids)
    if frame_type in ("send", "typing", "read"):
        await step({"type": "join", "room": room}, ("joined",), f"j{n}")
    if frame_type == "join":
        await step({"type": "join", "room": room}, ("joined",), f"j{n}")
    elif frame_type == "leave":
        await step({"type": "leave", "room": room}, ("left",), f"l{n}")
    elif frame_type == "send":
        await sock.send({"type": "send", "room": room, "body": "knock knock", "client_msg_id": f"cell-{n}"})
        got = await sock.until(lambda f: (f["type"] == "ack" and f["client_msg_id"] == f"cell-{n}")
                               or (f["type"] == "error" and f.get("ref") == f"cell-{n}"))
        labels.append(label(got))
    elif frame_type == "typing":
        await step({"type": "typing", "room": room}, ("typing",), f"t{n}")
    elif frame_type == "read":
        await step({"type": "read", "room": room, "seq": 1}, ("read",), f"r{n}")
    elif frame_type == "history":
        await step({"type": "history", "room": room}, ("history",), f"h{n}")
    elif frame_type == "resume":
        got = await step({"type": "resume", "rooms": {str(room): 0}}, ("joined",), f"s{n}")
        if got is not None and got["type"] == "joined":
            labels.append(label(await sock.until(lambda f: f["type"] == "resumed" and f["room"] == room)))
    elif frame_type == "ping":
        await step({"type": "ping"}, ("pong",), f"p{n}")
    return labels


ROOM_FRAMES_ALLOWED_TO_OUTSIDERS = ("error", "left")


def leaked(frames: list[dict[str, Any]], room: int) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("room") == room and f["type"] not in ROOM_FRAMES_ALLOWED_TO_OUTSIDERS]


async def member_activity(world: World, kind: str, attacker: Socket, frame_type: str, user_id: int) -> None:
    """Members of the room type, send, read and arrive while the attacker repeats its attempt."""
    room = world.rooms[kind]
    active = Socket(world.tokens["alice"])
    arriving = Socket(world.tokens[world.peers[kind]])
    try:
        assert (await active.open())["type"] == "hello"
        await active.send({"type": "join", "room": room})
        assert await active.until(lambda f: f["type"] == "joined")

        async def attack_again() -> None:
            for _ in range(8):
                await attempt(attacker, frame_type, room, user_id)

        async def ephemeral_flood() -> None:
            # Ephemeral frames of the room on the bus the whole time, as busy members produce
            # them (throttles per member do not matter here): item 7's window is short.
            for n in range(60):
                frame = {"type": "typing", "room": room, "user": {"id": world.users["bob"], "username": f"b{n}"}}
                await fanout.publish(room, None, dumps(frame))
                await asyncio.sleep(0.002)

        async def members() -> None:
            await active.send({"type": "typing", "room": room})
            msg_id = f"member-{next(_ids)}"
            await active.send({"type": "send", "room": room, "body": "members only", "client_msg_id": msg_id})
            message = await active.until(lambda f: f["type"] == "message" and f["client_msg_id"] == msg_id)
            assert message is not None, f"the member's message never came back: {active.frames[-5:]}"
            await active.send({"type": "read", "room": room, "seq": message["seq"]})
            assert await active.until(lambda f: f["type"] == "read" and f["user"]["id"] == world.users["alice"])
            assert (await arriving.open())["type"] == "hello"
            await arriving.send({"type": "join", "room": room})
            peer = world.peers[kind]
            assert await active.until(
                lambda f: f["type"] == "presence" and f["status"] == "online"
                and peer in {user["username"] for user in f["users"]}
            ), f"no presence of {peer}: {active.frames[-5:]}"

        await asyncio.gather(attack_again(), ephemeral_flood(), members())
        # What the bus delivered to the active member reached the attacker's outbox in the same
        # dispatch; the barrier reads everything queued before it.
        await active.barrier()
        await attacker.barrier()
    finally:
        await active.shut()
        await arriving.shut()


# --- the WebSocket cells --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("frame_type", "actor", "kind"), SOCKET_CELLS, ids=["-".join(c) for c in SOCKET_CELLS])
async def test_socket_frame_gets_the_documented_answer_and_leaks_nothing_of_the_room(
    live_world: World, frame_type: str, actor: str, kind: str
) -> None:
    expected = socket_answer(frame_type, actor, kind)
    room = live_world.rooms[kind]
    name = live_world.actor_name(actor)
    user_id = live_world.users[name] if name else 0
    attacker = Socket(live_world.actor_token(actor))
    try:
        first = await attacker.open()
        if actor == "no_token":
            got = [label(first), label(await attacker.next(5))]
            if attacker.close_code is not None:
                got[-1] = f"close:{attacker.close_code}"
            assert tuple(got) == expected.answer, f"{expected.why}: got {got}"
            # Frames that were in flight when the server closed must not blow up the consumer.
            await attacker.send({"type": frame_type, "room": room} if frame_type != "ping" else {"type": "ping"})
            await asyncio.sleep(0.05)
            assert not attacker.comm.future.done() or attacker.comm.future.exception() is None, (
                f"{frame_type} after the 4001 close raised {attacker.comm.future.exception()!r}"
            )
            assert attacker.frames == [first], f"a refused socket answered: {attacker.frames[1:]}"
            return
        assert first is not None and first["type"] == "hello"
        got = await attempt(attacker, frame_type, room, user_id)
        assert tuple(got) == expected.answer, f"{expected.why}: expected {expected.answer}, got {got}"
        if frame_type == "send" and not becomes_member(frame_type, actor, kind):
            stored = await database_sync_to_async(Message.objects.filter(room_id=room, sender_id=user_id).exists)()
            assert not stored, "a refused send was stored"
        if becomes_member(frame_type, actor, kind):
            is_member = await database_sync_to_async(
                Membership.objects.filter(room_id=room, user_id=user_id).exists)()
            assert is_member, "the documented join did not make a member"
            return
        await member_activity(live_world, kind, attacker, frame_type, user_id)
        assert not leaked(attacker.frames, room), (
            f"{actor} got frames of the {kind} after `{frame_type}`: {leaked(attacker.frames, room)[:5]}"
        )
        is_member = await database_sync_to_async(Membership.objects.filter(room_id=room, user_id=user_id).exists)()
        assert not is_member, f"{actor} became a member of the {kind}"
    finally:
        await attacker.shut()


# --- the HTTP cells -------------------------------------------------------------------------------


def http_request(world: World, endpoint: str, actor: str, kind: str) -> tuple[int, dict[str, Any]]:
    client = HttpClient(enforce_csrf_checks=True)
    token = world.actor_token(actor)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    method, path = endpoint.split(" ")
    path = path.replace("<id>", str(world.rooms[kind])).replace("<user>", world.peers[kind])
    body: dict[str, Any] | None = None
    if endpoint == "POST /api/rooms":
        body = {"name": f"new-{kind}", "kind": "group", "private": kind != "public_group"}
    elif endpoint == "POST /api/rooms/<id>/members":
        # A member invites the outsider; anyone else tries to invite themselves in.
        body = {"user": "eve" if actor in ("member", "no_token") else world.actor_name(actor)}
    elif endpoint == "POST /api/dms":
        body = {"user": world.peers[kind]}
    data = json.dumps(body) if body is not None else None
    response = getattr(client, method.lower())(path, data=data, content_type="application/json", **headers)
    return response.status_code, response.json()


def room_ids_in(value: Any) -> Iterator[int]:
    """Every room id a body shows: `id` of room objects, `room` of messages and pages."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("peer", "user", "sender"):
                continue  # user objects: their `id` is a user id
            if key in ("id", "room") and isinstance(item, int):
                yield item
            yield from room_ids_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from room_ids_in(item)


@pytest.mark.django_db
@pytest.mark.parametrize(("endpoint", "actor", "kind"), HTTP_CELLS, ids=["-".join(c) for c in HTTP_CELLS])
def test_http_endpoint_gets_the_documented_answer_and_leaks_nothing_of_the_room(
    world: World, endpoint: str, actor: str, kind: str
) -> None:
    expected = http_answer(endpoint, actor, kind)
    room = world.rooms[kind]
    members_before = set(Membership.objects.filter(room_id=room).values_list("user_id", flat=True))
    status, body = http_request(world, endpoint, actor, kind)
    assert status == expected.status, f"{expected.why}: got {status} {body}"
    if expected.code is not None:
        assert body["error"]["code"] == expected.code, body
        assert set(body) == {"error"}, f"an error answer carries more: {body}"
    shown = set(room_ids_in(body))
    if expected.room == "listed":
        assert room in shown, f"{expected.why}: room {room} missing from {body}"
    else:
        assert room not in shown, f"{expected.why}: room {room} shown to {actor}: {body}"
        text = json.dumps(body)
        for secret in (f"seed of {kind}",):
            assert secret not in text, f"the {kind}'s messages leaked to {actor}: {body}"
    members_after = set(Membership.objects.filter(room_id=room).values_list("user_id", flat=True))
    if not ((endpoint, actor) in CHANGES_MEMBERS and expected.status == 200):
        assert members_after == members_before, f"{endpoint} by {actor} changed the {kind}'s members"


def test_the_matrix_covers_every_api_route_and_every_client_frame() -> None:
    """A new endpoint or frame type must get its row in the tables above."""
    routes = set()
    for pattern in get_resolver().url_patterns:
        if isinstance(pattern, URLPattern) and str(pattern.pattern).startswith("api/"):
            routes.add(str(pattern.pattern).replace("<int:room_id>", "<id>").replace("<str:username>", "<user>"))
    covered = {endpoint.split(" ")[1].lstrip("/") for endpoint in ENDPOINTS}
    # Login and registration take no credentials by design (tests/test_http_api.py).
    assert routes - {"api/auth/token", "api/auth/register"} <= covered, routes - covered
    assert {rule_frame for r in SOCKET_RULES if r.frames for rule_frame in r.frames} == set(CLIENT_TYPES)
    for cell in SOCKET_CELLS:
        socket_answer(*cell)  # every cell has a rule


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/internal/drain", "/metrics"])
@pytest.mark.parametrize("actor", ACTORS)
def test_operational_endpoints_are_not_on_the_public_api_for_anyone(world: World, path: str, actor: str) -> None:
    """Contract: no HTTP drain endpoint any more (404), metrics on their own port (not public)."""
    from chat.process import STATE

    token = world.actor_token(actor)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    draining = STATE.draining
    response = HttpClient().post(path, REMOTE_ADDR="203.0.113.7", HTTP_X_FORWARDED_FOR="127.0.0.1", **headers)
    assert STATE.draining == draining, "a public request started a drain"
    assert response.status_code == 404, (path, response.status_code)

