"""store_batch: what each message of a mixed batch becomes, and the seqs it gets.

Every test runs against both store paths: the ORM one (`chat.services.store_batch`, SQLite's)
and the worker's async PostgreSQL one (`chat.store_pg`), which must give the same answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from django.db import connection

from chat import services
from chat.models import Bot, Message, Room
from chat.services import create_group, open_dm
from tests.helpers import make_user

# Committed data: the PostgreSQL path reads with a connection of its own.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["orm", "store_pg"])
def store_batch(request: pytest.FixtureRequest) -> Iterator[Callable[[list[dict]], list[services.Outcome]]]:
    if request.param == "orm":
        yield services.store_batch
        return
    if connection.vendor != "postgresql":
        pytest.skip("the async store path is PostgreSQL's")
    from chat.store_pg import PgStore, conninfo_from_django

    loop = asyncio.new_event_loop()
    store = PgStore(conninfo_from_django())
    yield lambda items: loop.run_until_complete(store.store_batch(items))
    loop.run_until_complete(store.close())
    loop.close()


def item(room: int, sender: int, client_msg_id: str, body: str = "hi") -> dict:
    return {"room": room, "sender": sender, "body": body, "client_msg_id": client_msg_id}


def test_a_mixed_batch_gets_one_outcome_per_message_in_order(store_batch):
    alice, _ = make_user("alice")
    bob, _ = make_user("bob")
    first = create_group(alice, "first", False)
    second = create_group(alice, "second", False)
    bobs = create_group(bob, "bobs", True)
    store_batch([item(first.pk, alice.pk, "earlier")])

    outcomes = store_batch([
        item(second.pk, alice.pk, "s1"),
        item(first.pk, alice.pk, "f1"),
        item(bobs.pk, alice.pk, "not-a-member"),
        item(987654, alice.pk, "no-such-room"),
        item(first.pk, alice.pk, "f1"),  # the same retry twice in one batch
        item(first.pk, alice.pk, "earlier"),  # a retry of an already stored message
        item(second.pk, alice.pk, "s2"),
    ])

    summary = [(o.status, o.room, o.seq, o.code) for o in outcomes]
    assert summary == [
        ("stored", second.pk, 1, None),
        ("stored", first.pk, 2, None),
        ("error", None, None, "forbidden"),
        ("error", None, None, "not_found"),
        ("duplicate", first.pk, 2, None),
        ("duplicate", first.pk, 1, None),
        ("stored", second.pk, 2, None),
    ]
    assert outcomes[1].frame["sender"] == {"id": alice.pk, "username": "alice"}
    assert outcomes[5].frame["body"] == "hi" and outcomes[5].frame["seq"] == 1
    assert list(Room.objects.filter(pk__in=[first.pk, second.pk, bobs.pk]).order_by("pk").values_list(
        "last_seq", flat=True)) == [2, 2, 0]
    assert Message.objects.count() == 4


def test_consecutive_batches_continue_the_room_seq_without_gaps(store_batch):
    alice, _ = make_user("alice")
    room = create_group(alice, "team", False)
    for batch in range(3):
        store_batch([item(room.pk, alice.pk, f"b{batch}-{n}") for n in range(4)])
    seqs = list(Message.objects.filter(room=room).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 13))


def test_a_message_to_a_bot_asks_the_bot_to_answer_and_the_bots_own_does_not(store_batch):
    alice, _ = make_user("alice")
    helper, _ = make_user("helpbot")
    bot = Bot.objects.create(user=helper)
    room = open_dm(alice, "helpbot")
    outcomes = store_batch([item(room.pk, alice.pk, "q1", "help"), item(room.pk, helper.pk, "a1", "sure")])
    assert outcomes[0].bot_job == {
        "type": "bot.reply", "room": room.pk, "bot": bot.pk, "seq": 1,
        "sender": alice.pk, "sender_name": "alice", "body": "help",
    }
    assert outcomes[1].status == "stored" and outcomes[1].bot_job is None


def test_a_stored_message_reads_back_as_the_very_frame_that_was_fanned_out(store_batch):
    alice, _ = make_user("alice")
    room = create_group(alice, "team", False)
    [outcome] = store_batch([item(room.pk, alice.pk, "c1", "hello")])
    stored = Message.objects.select_related("sender").get(room=room, seq=1)
    # History and resume build frames from the row: a client must not see two sent_at values.
    assert outcome.frame == services.message_frame(stored, "alice")
    [retry] = store_batch([item(room.pk, alice.pk, "c1", "hello")])
    assert retry.status == "duplicate" and retry.frame == outcome.frame


def test_a_value_the_database_refuses_costs_only_its_own_message(store_batch):
    if connection.vendor != "postgresql":
        pytest.skip("SQLite stores NUL characters; PostgreSQL refuses them")
    alice, _ = make_user("alice")
    bob, _ = make_user("bob")
    room = create_group(alice, "team", False)
    room.memberships.create(user=bob)
    outcomes = store_batch([
        item(room.pk, alice.pk, "ok-1", "fine"),
        item(room.pk, bob.pk, "poison", "a\x00b"),  # past the protocol's own check, e.g. an old client
        item(room.pk, alice.pk, "ok-2", "fine too"),
    ])
    assert [(o.status, o.seq, o.code) for o in outcomes] == [
        ("stored", 1, None), ("error", None, "invalid_frame"), ("stored", 2, None),
    ]
    assert list(Message.objects.filter(room=room).order_by("seq").values_list("body", flat=True)) == [
        "fine", "fine too",
    ]


def test_workers_storing_the_same_retries_at_once_store_each_message_once_without_gaps():
    # Senders retry with the same client_msg_id, and a retry may reach another worker while the
    # first copy is being stored: whichever store loses the race on the unique key plans its
    # batch again and answers `duplicate` with the winner's seq; no seq is spent on a loser.
    if connection.vendor != "postgresql":
        pytest.skip("the async store path is PostgreSQL's")
    from chat.store_pg import PgStore, conninfo_from_django

    alice, _ = make_user("alice")
    room = create_group(alice, "busy", False)
    batch = [item(room.pk, alice.pk, f"m{n}") for n in range(3)]

    async def race() -> list[list[services.Outcome]]:
        stores = [PgStore(conninfo_from_django()) for _ in range(5)]
        try:
            for store in stores:  # connected first, so that their reads and writes overlap
                await store._connection()
            return await asyncio.gather(*(store.store_batch(batch) for store in stores))
        finally:
            for store in stores:
                await store.close()

    answers = asyncio.run(race())
    for n in range(3):
        assert {(answer[n].room, answer[n].seq) for answer in answers} == {(room.pk, n + 1)}
        assert sorted(answer[n].status for answer in answers) == ["duplicate"] * 4 + ["stored"]
    room.refresh_from_db()
    assert room.last_seq == 3
    assert Message.objects.filter(room=room).count() == 3
