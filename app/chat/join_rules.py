"""Who may join which room, and what a `joined` frame says of it: one set of rules for both
read paths (the ORM in `chat.services`, async PostgreSQL in `chat.reads_pg`).

ORM-free on purpose, like `chat.batch_plan`: each path reads the same facts in its own way
(`RoomFacts`), and these functions decide.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from chat.batch_plan import user_ref
from chat.protocol import ErrorCode, ProtocolError

# Room kinds as stored (`chat.models.Room.Kind`), spelled here so the rules need no ORM; the
# tests check them against the model.
GROUP = "group"
PAIR_KINDS = ("dm", "bot")


class RoomFacts(NamedTuple):
    """What a join needs to know of one room, as seen by the joining user."""

    id: int
    name: str
    kind: str
    private: bool
    last_seq: int
    # None when the user is not a member.
    last_read_seq: int | None
    # The other member of a DM or bot chat the user is in; None otherwise.
    peer_id: int | None = None
    peer_name: str | None = None


Answer = dict[str, Any] | ProtocolError


def answer_joins(room_ids: list[int], facts: dict[int, RoomFacts]) -> tuple[dict[int, Answer], list[int]]:
    """Each room's answer (the room as the user sees it, or the refusal), and the rooms the
    user becomes a member of by joining (public groups only: DMs, bot chats and private groups
    need an existing membership)."""
    answers: dict[int, Answer] = {}
    new_member_of: list[int] = []
    for room_id in room_ids:
        if room_id in answers:
            continue  # named twice: one answer
        room = facts.get(room_id)
        if room is None:
            answers[room_id] = ProtocolError(ErrorCode.NOT_FOUND, f"room {room_id} does not exist")
            continue
        member = room.last_read_seq is not None
        if not member and (room.kind != GROUP or room.private):
            answers[room_id] = ProtocolError(ErrorCode.FORBIDDEN, f"you are not a member of room {room_id}")
            continue
        if not member:
            new_member_of.append(room_id)
        data: dict[str, Any] = {
            "id": room.id, "name": room.name, "kind": room.kind, "private": room.private,
            "last_seq": room.last_seq,
        }
        if member and room.kind in PAIR_KINDS and room.peer_id is not None:
            data["name"] = room.peer_name
            data["peer"] = user_ref(room.peer_id, room.peer_name)
        data["last_read_seq"] = room.last_read_seq or 0
        answers[room_id] = data
    return answers, new_member_of
