"""The protocol process's reads: both paths give the same answers, and the async one batches.

Every read test runs against the ORM path (`chat.reads.OrmReads`, SQLite's and PARLEY_STORE=orm)
and the async PostgreSQL path (`chat.reads_pg`), which must answer alike. The coalescer that
batches the async path's lookups is tested on its own, without a database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.utils import timezone

from chat import join_rules, reads, reads_pg, services, tokens
from chat.coalesce import Coalescer
from chat.models import ApiToken, Membership, Room
from chat.protocol import ProtocolError
from chat.services import create_group, open_dm
from tests.helpers import make_user, record_async_reads

# Committed data: the PostgreSQL path reads with connections of its own.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["orm", "reads_pg"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The read path under test, behind `chat.reads` (the interface the consumer calls)."""
    if request.param == "orm":
        chosen: Any = reads.OrmReads()
    elif connection.vendor != "postgresql":
        pytest.skip("the async read path is PostgreSQL's")
    else:
        chosen = reads_pg
    monkeypatch.setattr(reads, "backend", lambda: chosen)
    yield chosen


def run(coroutine: Any) -> Any:
    """Each call on a fresh loop, as a test with several event loops would see it."""
    return asyncio.run(coroutine)


async def closing(coroutine: Any) -> Any:
    try:
        return await coroutine
    finally:
        await reads_pg.close()


def read(backend: Any, name: str, *args: Any) -> Any:
    """`chat.reads.<name>(*args)`, answered by `backend`."""
    assert reads.backend() is backend
    return run(closing(getattr(reads, name)(*args)))


# --- joins ---------------------------------------------------------------------------------------


def test_join_answers_each_room_as_the_user_sees_it(backend):
    alice, _ = make_user("alice")
    bob, _ = make_user("bob")
    public = create_group(alice, "pub", False)
    private = create_group(alice, "priv", True)
    dm = open_dm(alice, "bob")
    Membership.objects.filter(room=dm, user=bob).update(last_read_seq=0)
    answers = read(backend, "join_rooms", bob.pk, [public.pk, private.pk, dm.pk, 987654, public.pk])

    assert set(answers) == {public.pk, private.pk, dm.pk, 987654}
    assert answers[public.pk] == {"id": public.pk, "name": "pub", "kind": "group", "private": False,
                                  "last_seq": 0, "last_read_seq": 0}
    assert isinstance(answers[private.pk], ProtocolError) and answers[private.pk].code == "forbidden"
    assert answers[dm.pk]["name"] == "alice"
    assert answers[dm.pk]["peer"] == {"id": alice.pk, "username": "alice"}
    assert isinstance(answers[987654], ProtocolError) and answers[987654].code == "not_found"
    # Joining a public group makes a member (once, though the room was named twice); nothing else.
    assert list(Membership.objects.filter(user=bob).values_list("room_id", flat=True).order_by("room_id")) == sorted(
        [public.pk, dm.pk])


def test_a_member_sees_its_read_marker_and_the_rooms_last_seq(backend):
    alice, _ = make_user("alice")
    room = create_group(alice, "r", True)
    Room.objects.filter(pk=room.pk).update(last_seq=42)
    Membership.objects.filter(room=room, user=alice).update(last_read_seq=40)
    answer = read(backend, "join_rooms", alice.pk, [room.pk])[room.pk]
    assert (answer["last_seq"], answer["last_read_seq"], answer["private"]) == (42, 40, True)
    assert read(backend, "last_seqs", [room.pk, 987654]) == {room.pk: 42}


def test_room_kinds_in_the_rules_are_the_models():
    assert join_rules.GROUP == Room.Kind.GROUP
    assert set(join_rules.PAIR_KINDS) == {Room.Kind.DM, Room.Kind.BOT}


# --- tokens --------------------------------------------------------------------------------------


def test_a_token_is_found_until_it_expires_or_its_user_is_deactivated(backend):
    alice, token = make_user("alice")
    tokens.CACHE.clear()
    info = read(backend, "find_token", token)
    assert (info.user_id, info.username) == (alice.pk, "alice")
    assert read(backend, "find_token", "x" * 43) is None  # well-formed, unknown
    assert read(backend, "find_token", "not a token") is None

    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    tokens.CACHE.clear()
    assert read(backend, "find_token", token) is None
    ApiToken.objects.update(expires_at=timezone.now() + timedelta(days=1))
    alice.is_active = False
    alice.save()
    tokens.CACHE.clear()
    assert read(backend, "find_token", token) is None


def test_last_used_is_written_once_an_hour(backend):
    _, token = make_user("alice")
    tokens.CACHE.clear()
    read(backend, "find_token", token)
    first = ApiToken.objects.get().last_used
    assert first is not None
    tokens.CACHE.clear()
    read(backend, "find_token", token)
    assert ApiToken.objects.get().last_used == first
    ApiToken.objects.update(last_used=first - timedelta(hours=2))
    tokens.CACHE.clear()
    read(backend, "find_token", token)
    assert ApiToken.objects.get().last_used > first


# --- catch-ups -----------------------------------------------------------------------------------


def store(room: Room, sender: Any, count: int) -> None:
    services.store_batch([{"room": room.pk, "sender": sender.pk, "body": f"m{n}", "client_msg_id": f"{room.pk}-{n}"}
                          for n in range(count)])


def test_catch_up_gives_each_room_what_follows_its_seq_up_to_the_limit(backend):
    alice, _ = make_user("alice")
    first, second, quiet = (create_group(alice, name, False) for name in ("first", "second", "quiet"))
    store(first, alice, 5)
    store(second, alice, 2)
    found = read(backend, "messages_after_many", {first.pk: 1, second.pk: 0, quiet.pk: 0}, 3)

    assert [f["seq"] for f in found[first.pk]] == [2, 3, 4]
    assert [f["seq"] for f in found[second.pk]] == [1, 2]
    assert found[quiet.pk] == []
    frame = found[second.pk][0]
    assert frame["sender"] == {"id": alice.pk, "username": "alice"}
    assert frame["body"] == "m0" and frame["sent_at"].endswith("Z")
    # The same frames as the ORM path builds, field for field.
    assert found == services.messages_after_many({first.pk: 1, second.pk: 0, quiet.pk: 0}, 3)


# --- the async path batches what many sockets ask at once ----------------------------------------


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    if connection.vendor != "postgresql":
        pytest.skip("the async read path is PostgreSQL's")
    sent: list[str] = []
    record_async_reads(monkeypatch, sent.append)
    return sent


def test_joins_of_many_sockets_at_once_share_statements(statements):
    users = [make_user(f"u{n}")[0] for n in range(60)]
    room = create_group(users[0], "crowd", False)

    async def everyone_joins() -> list[Any]:
        return await asyncio.gather(*(reads_pg.join_rooms(user.pk, [room.pk]) for user in users))

    answers = run(closing(everyone_joins()))
    assert all(answer[room.pk]["id"] == room.pk for answer in answers)
    assert Membership.objects.filter(room=room).count() == 60
    # One lookup statement and one insert per batch. The first few go out alone, one per free
    # connection (a trickle waits for nothing); the rest queue behind them and share one:
    # a handful of statements, not one lookup and one insert per socket (120).
    assert 2 <= len(statements) <= 20, len(statements)


async def test_an_unreachable_database_is_reported_as_unavailable(monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("the async read path is PostgreSQL's")
    monkeypatch.setattr(reads_pg, "conninfo_from_django", lambda name: "host=127.0.0.1 port=9 connect_timeout=2")
    await reads_pg.close()
    try:
        with pytest.raises(reads.DatabaseUnavailable):
            await reads_pg.last_seqs([1])
    finally:
        await reads_pg.close()


# --- the coalescer -------------------------------------------------------------------------------


class Fetcher:
    """A fetch that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def __call__(self, keys: list[int]) -> dict[int, str]:
        self.batches.append(keys)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {key: f"v{key}" for key in keys if key >= 0}


async def test_a_lone_lookup_goes_out_at_once():
    fetch = Fetcher()
    assert await Coalescer(fetch, lanes=1, max_batch=10).get(1) == "v1"
    assert fetch.batches == [[1]]


async def test_lookups_arriving_while_the_lanes_are_busy_form_one_batch():
    fetch = Fetcher()
    fetch.gate.clear()
    coalescer = Coalescer(fetch, lanes=1, max_batch=3)
    first = asyncio.ensure_future(coalescer.get(0))
    await asyncio.sleep(0)
    rest = asyncio.ensure_future(coalescer.get_many([1, 2, 3, 2, 4, -1]))
    await asyncio.sleep(0)
    assert fetch.batches == [[0]]  # the lane is busy: the others wait, together
    fetch.gate.set()
    assert await first == "v0"
    assert await rest == {1: "v1", 2: "v2", 3: "v3", 4: "v4", -1: None}
    # Keys asked twice fetched once; batches no larger than max_batch.
    assert fetch.batches == [[0], [1, 2, 3], [4, -1]]


async def test_one_callers_keys_go_out_together():
    fetch = Fetcher()
    assert await Coalescer(fetch, lanes=4, max_batch=10).get_many(range(6)) == {n: f"v{n}" for n in range(6)}
    assert fetch.batches == [[0, 1, 2, 3, 4, 5]]


async def test_a_failed_batch_fails_each_of_its_waiters_and_the_next_one_runs():
    fetch = Fetcher()
    fetch.gate.clear()
    fetch.fail = RuntimeError("database gone")
    coalescer = Coalescer(fetch, lanes=1, max_batch=10)
    waiters = [asyncio.ensure_future(coalescer.get(n)) for n in range(3)]
    await asyncio.sleep(0)
    fetch.gate.set()
    for waiter in waiters:
        with pytest.raises(RuntimeError, match="database gone"):
            await waiter
    fetch.fail = None
    assert await coalescer.get(7) == "v7"


async def test_a_cancelled_waiter_does_not_cancel_the_answer_others_wait_for():
    fetch = Fetcher()
    fetch.gate.clear()
    coalescer = Coalescer(fetch, lanes=1, max_batch=10)
    leaving = asyncio.ensure_future(coalescer.get(5))
    staying = asyncio.ensure_future(coalescer.get(5))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    fetch.gate.set()
    assert await staying == "v5"
    assert leaving.cancelled()


def test_sync_and_async_token_checks_share_the_cache():
    run(database_sync_to_async(lambda: None)())  # the ORM thread starts, as in a server
    assert tokens.cached("not a token") == (None, True, None)
