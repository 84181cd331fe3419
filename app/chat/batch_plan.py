"""What a batch of `persist.message` items becomes: the rules both store paths share.

Two paths store messages: the async, set-based PostgreSQL path the worker runs
(`chat.store_pg`), and the ORM path (`chat.services.store_batch`, for SQLite under `make run`).
Each reads the same facts from its database (messages already stored under the batch's
`(sender, client_msg_id)` keys, which senders are active members of which rooms, the seqs it
reserved) and hands them to the pure functions here, which decide every item's outcome. So a
retry, a conflict, a refusal or a bot job means the same thing whichever database stored it,
and `tests/test_store.py` pins it once for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from chat.contract import BotReply
from chat.protocol import ErrorCode

# Room kinds as stored (chat.models.Room.Kind): this module must not import the ORM.
BOT_ROOM = "bot"
TEXT_MESSAGE = "text"


class StoredMessage(NamedTuple):
    """A message row as both store paths read or write it."""

    room: int
    seq: int
    sender: int | None
    username: str | None
    body: str
    kind: str
    created_at: datetime
    client_msg_id: str


class Reserved(NamedTuple):
    """A room's seq reservation: the last seq taken, its kind, and its bot's user (bot chats)."""

    last_seq: int
    kind: str
    bot: int | None
    bot_user: int | None


@dataclass
class Outcome:
    """What happened to one `persist.message`: stored, already stored, or refused."""

    item: dict[str, Any]
    status: str  # "stored" | "duplicate" | "error"
    room: int | None = None
    seq: int | None = None
    frame: dict[str, Any] | None = None
    code: ErrorCode | None = None
    message: str = ""
    bot_job: BotReply | None = field(default=None)


def user_ref(user_id: int | None, username: str | None) -> dict[str, Any] | None:
    if user_id is None:
        return None
    return {"id": user_id, "username": username}


def message_frame(message: StoredMessage) -> dict[str, Any]:
    """The one `message` frame shape, for live fan-out, resume and history alike."""
    return {
        "type": "message",
        "room": message.room,
        "seq": message.seq,
        "sender": user_ref(message.sender, message.username),
        "body": message.body,
        "kind": message.kind,
        "sent_at": message.created_at.isoformat().replace("+00:00", "Z"),
        "client_msg_id": message.client_msg_id,
    }


def conflict(item: dict[str, Any], stored_room: int) -> Outcome:
    # Acking it as the message of another room would tell the sender a message was stored
    # that never was; the id must be new per message (docs/protocol.md).
    return Outcome(item, "error", code=ErrorCode.CONFLICT,
                   message=f"client_msg_id {item['client_msg_id']!r} is already used by your message in "
                           f"room {stored_room}; use a new id for a new message")


def refused_by_database(item: dict[str, Any]) -> Outcome:
    """A message the database will never take (a value it refuses): a permanent error."""
    return Outcome(item, "error", code=ErrorCode.INVALID_FRAME,
                   message="the database refused this message; it will not be stored")


def stored_by_another(item: dict[str, Any], found: tuple[int, int] | None) -> Outcome:
    """The outcome of a retry that a concurrent worker stored first, from its `(room, seq)`."""
    if found is None:
        return Outcome(item, "error", code=ErrorCode.INTERNAL, message="could not store the message")
    if found[0] != item["room"]:
        return conflict(item, found[0])
    return Outcome(item, "duplicate", room=found[0], seq=found[1])


def keys_of(items: list[dict[str, Any]]) -> tuple[list[int], list[str]]:
    """The `(sender, client_msg_id)` keys of a batch, as two parallel lists (for `unnest`)."""
    return [item["sender"] for item in items], [item["client_msg_id"] for item in items]


@dataclass
class BatchPlan:
    """The outcome of each item so far, and the new messages to store, by room."""

    items: list[dict[str, Any]]
    outcomes: list[Outcome | None]
    # Indexes of the messages to store, by room, in arrival order (seqs follow it).
    per_room: dict[int, list[int]]
    # Indexes of messages from non-members (or to rooms that do not exist).
    refused: list[int]
    # The first copy of each key in this batch (later copies are duplicates of it).
    first_copy: dict[tuple[int, str], int]

    def counts(self) -> list[tuple[int, int]]:
        """(room, messages to store) in room id order: the order rooms are locked in, so that
        concurrent workers cannot deadlock."""
        return [(room, len(self.per_room[room])) for room in sorted(self.per_room)]

    def new_messages(
        self, reserved: dict[int, Reserved], created_at: datetime, usernames: dict[int, str]
    ) -> list[tuple[int, StoredMessage]]:
        """The rows to insert, with their seqs; rooms that could not be reserved (deleted since
        the membership check) have their messages refused."""
        rows = []
        for room, indexes in sorted(self.per_room.items()):
            got = reserved.get(room)
            if got is None:
                self.refused.extend(indexes)
                continue
            for seq, index in enumerate(indexes, start=got.last_seq - len(indexes) + 1):
                item = self.items[index]
                rows.append((index, StoredMessage(
                    room, seq, item["sender"], usernames.get(item["sender"]), item["body"],
                    item.get("kind", TEXT_MESSAGE), created_at, item["client_msg_id"],
                )))
        return rows

    def finish(
        self, stored: list[tuple[int, StoredMessage]], reserved: dict[int, Reserved], rooms_that_exist: set[int]
    ) -> list[Outcome]:
        """Every item's outcome, in the batch's order. `rooms_that_exist` needs to cover only the
        rooms of `refused` items: it tells "not a member" from "no such room"."""
        items, outcomes = self.items, self.outcomes
        for index in self.refused:
            room = items[index]["room"]
            if room in rooms_that_exist:
                outcomes[index] = Outcome(items[index], "error", code=ErrorCode.FORBIDDEN,
                                          message=f"you are not a member of room {room}")
            else:
                outcomes[index] = Outcome(items[index], "error", code=ErrorCode.NOT_FOUND,
                                          message=f"room {room} does not exist")
        for index, message in stored:
            outcome = Outcome(items[index], "stored", room=message.room, seq=message.seq, frame=message_frame(message))
            room = reserved[message.room]
            if room.kind == BOT_ROOM and room.bot and message.kind == TEXT_MESSAGE and room.bot_user != message.sender:
                outcome.bot_job = {
                    "type": "bot.reply", "room": message.room, "bot": room.bot, "seq": message.seq,
                    "sender": message.sender, "sender_name": message.username or "", "body": message.body,
                }
            outcomes[index] = outcome
        for index, outcome in enumerate(outcomes):
            assert outcome is not None
            if outcome.status == "duplicate" and outcome.seq is None:
                first = outcomes[self.first_copy[(items[index]["sender"], items[index]["client_msg_id"])]]
                assert first is not None
                outcome.room, outcome.seq = first.room, first.seq
        return [outcome for outcome in outcomes if outcome is not None]


def plan_batch(
    items: list[dict[str, Any]],
    existing: dict[tuple[int, str], StoredMessage],
    members: set[tuple[int, int]],
) -> BatchPlan:
    """Classify each item: a retry of a stored message, a conflict (its id used in another
    room), a second copy within the batch, a non-member's, or new.

    `existing` holds the messages already stored under the batch's keys; `members` the
    (room, user) pairs of active members among the batch's senders and rooms.
    """
    outcomes: list[Outcome | None] = [None] * len(items)
    first_copy: dict[tuple[int, str], int] = {}
    per_room: dict[int, list[int]] = {}
    refused: list[int] = []
    for index, item in enumerate(items):
        key = (item["sender"], item["client_msg_id"])
        found = existing.get(key)
        if found is not None and found.room != item["room"]:
            outcomes[index] = conflict(item, found.room)
        elif found is not None:
            outcomes[index] = Outcome(item, "duplicate", room=found.room, seq=found.seq, frame=message_frame(found))
        elif key in first_copy and items[first_copy[key]]["room"] != item["room"]:
            outcomes[index] = conflict(item, items[first_copy[key]]["room"])
        elif key in first_copy:
            outcomes[index] = Outcome(item, "duplicate")  # filled in once the first copy has a seq
        elif (item["room"], item["sender"]) not in members:
            refused.append(index)
        else:
            first_copy[key] = index
            per_room.setdefault(item["room"], []).append(index)
    return BatchPlan(items, outcomes, per_room, refused, first_copy)
