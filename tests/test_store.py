"""store_batch: what each message of a mixed batch becomes, and the seqs it gets."""

from __future__ import annotations

import pytest

from chat.models import Bot, Message, Room
from chat.services import create_group, open_dm, store_batch
from tests.helpers import make_user

pytestmark = pytest.mark.django_db


def item(room: int, sender: int, client_msg_id: str, body: str = "hi") -> dict:
    return {"room": room, "sender": sender, "body": body, "client_msg_id": client_msg_id}


def test_a_mixed_batch_gets_one_outcome_per_message_in_order():
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


def test_consecutive_batches_continue_the_room_seq_without_gaps():
    alice, _ = make_user("alice")
    room = create_group(alice, "team", False)
    for batch in range(3):
        store_batch([item(room.pk, alice.pk, f"b{batch}-{n}") for n in range(4)])
    seqs = list(Message.objects.filter(room=room).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 13))


def test_a_message_to_a_bot_asks_the_bot_to_answer_and_the_bots_own_does_not():
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
