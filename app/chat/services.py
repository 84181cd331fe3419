"""Database operations of the chat domain (synchronous: call through database_sync_to_async).

Authorization lives here too, so the WebSocket consumer, the HTTP API and the workers apply the
same rules: only members read or post; nobody joins a DM, a bot chat or a private room uninvited.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Q, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from chat import batch_plan, join_rules
from chat.batch_plan import Outcome, Reserved, StoredMessage, user_ref
from chat.models import Bot, Membership, Message, Room
from chat.protocol import ErrorCode, ProtocolError

User = get_user_model()
log = logging.getLogger(__name__)


def message_frame(message: Message, sender_username: str | None) -> dict[str, Any]:
    """A stored message's `message` frame (the shape is `chat.batch_plan.message_frame`)."""
    return batch_plan.message_frame(stored_message(message, sender_username))


def stored_message(message: Message, sender_username: str | None) -> StoredMessage:
    return StoredMessage(message.room_id, message.seq, message.sender_id, sender_username, message.body,
                         message.kind, message.created_at, message.client_msg_id)


def room_dict(room: Room, user_id: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": room.pk,
        "name": room.name,
        "kind": room.kind,
        "private": room.private,
        "last_seq": room.last_seq,
    }
    if room.kind in (Room.Kind.DM, Room.Kind.BOT) and user_id is not None:
        others = [m.user for m in room.memberships.select_related("user") if m.user_id != user_id]
        if others:
            data["name"] = others[0].get_username()
            data["peer"] = user_ref(others[0].pk, others[0].get_username())
    return data


# --- rooms and membership ---------------------------------------------------------------------


def join_rooms(user_id: int, room_ids: list[int]) -> dict[int, join_rules.Answer]:
    """Make the user a member of each room that allows it (`chat.join_rules`), in a fixed
    number of queries for any count: rooms, the user's memberships and, for DMs and bot chats,
    the peer; and one insert for the public groups the user is joining for the first time.
    (`chat.reads_pg.join_rooms` is the same on PostgreSQL, in one statement.)"""
    rooms = {room.pk: room for room in Room.objects.filter(pk__in=room_ids)}
    read_seqs = dict(
        Membership.objects.filter(user_id=user_id, room_id__in=list(rooms)).values_list("room_id", "last_read_seq")
    )
    pairs = [pk for pk, room in rooms.items() if room.kind in join_rules.PAIR_KINDS and pk in read_seqs]
    peers: dict[int, tuple[int, str]] = {}
    if pairs:
        for room_id, peer_id, peer_name in (
            Membership.objects.filter(room_id__in=pairs).exclude(user_id=user_id)
            .values_list("room_id", "user_id", "user__username")
        ):
            peers[room_id] = (peer_id, peer_name)
    facts = {
        pk: join_rules.RoomFacts(pk, room.name, room.kind, room.private, room.last_seq, read_seqs.get(pk),
                                 *peers.get(pk, (None, None)))
        for pk, room in rooms.items()
    }
    answers, new_member_of = join_rules.answer_joins(room_ids, facts)
    if new_member_of:
        # ignore_conflicts: a second socket of the same user may join at the same moment.
        Membership.objects.bulk_create([Membership(room_id=pk, user_id=user_id) for pk in new_member_of],
                                       ignore_conflicts=True)
    return answers


def leave_room(user_id: int, room_id: int) -> None:
    """Leaving a group ends the membership; DMs and bot chats cannot be left."""
    require_member(user_id, room_id)
    if not Room.objects.filter(pk=room_id, kind=Room.Kind.GROUP).exists():
        raise ProtocolError(ErrorCode.FORBIDDEN, "only group rooms can be left")
    Membership.objects.filter(room_id=room_id, user_id=user_id).delete()


def remove_member(remover_id: int, room_id: int, username: str) -> int:
    """The room's creator removes a member of a group; returns the removed user's id."""
    require_member(remover_id, room_id)
    room = Room.objects.get(pk=room_id)
    if room.kind != Room.Kind.GROUP or room.created_by_id != remover_id:
        raise ProtocolError(ErrorCode.FORBIDDEN, "only the room's creator removes members")
    member = User.objects.filter(username=username).first()
    if member is None or not Membership.objects.filter(room=room, user=member).exists():
        raise ProtocolError(ErrorCode.NOT_FOUND, f"{username!r} is not a member of room {room_id}")
    if member.pk == remover_id:
        raise ProtocolError(ErrorCode.FORBIDDEN, "leave the room instead of removing yourself")
    Membership.objects.filter(room=room, user=member).delete()
    return member.pk


def require_member(user_id: int, room_id: int) -> None:
    if not Membership.objects.filter(room_id=room_id, user_id=user_id).exists():
        if not Room.objects.filter(pk=room_id).exists():
            raise ProtocolError(ErrorCode.NOT_FOUND, f"room {room_id} does not exist")
        raise ProtocolError(ErrorCode.FORBIDDEN, f"you are not a member of room {room_id}")


def create_group(user: AbstractBaseUser, name: str, private: bool) -> Room:
    with transaction.atomic():
        room = Room.objects.create(name=name, kind=Room.Kind.GROUP, private=private, created_by=user)
        Membership.objects.create(room=room, user=user)
    return room


def invite(inviter_id: int, room_id: int, username: str) -> Room:
    require_member(inviter_id, room_id)
    room = Room.objects.get(pk=room_id)
    if room.kind != Room.Kind.GROUP:
        raise ProtocolError(ErrorCode.FORBIDDEN, "only group rooms take invitations")
    invitee = User.objects.filter(username=username).first()
    if invitee is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no user named {username!r}")
    Membership.objects.get_or_create(room=room, user=invitee)
    return room


def _pair_key(a: int, b: int) -> str:
    low, high = sorted((a, b))
    return f"{low}:{high}"


def open_dm(user: AbstractBaseUser, other_username: str) -> Room:
    """Open (or find) the 1:1 room of two users; a bot's name opens a bot chat."""
    other = User.objects.filter(username=other_username).first()
    if other is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no user named {other_username!r}")
    if other.pk == user.pk:
        raise ProtocolError(ErrorCode.FORBIDDEN, "a direct message needs another user")
    bot = Bot.objects.filter(user=other).first()
    key = _pair_key(user.pk, other.pk)
    existing = Room.objects.filter(pair_key=key).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            room = Room.objects.create(
                name=f"{user.get_username()} & {other.get_username()}",
                kind=Room.Kind.BOT if bot else Room.Kind.DM,
                private=True,
                created_by=user,
                pair_key=key,
                bot=bot,
            )
            Membership.objects.bulk_create([Membership(room=room, user=user), Membership(room=room, user=other)])
            return room
    except IntegrityError:
        # Both users opened it at once: the other transaction won, its room is the room.
        return Room.objects.get(pair_key=key)


def rooms_for(user_id: int) -> list[dict[str, Any]]:
    memberships = (
        Membership.objects.filter(user_id=user_id).select_related("room").order_by("room__kind", "room_id")
    )
    result = []
    for membership in memberships:
        data = room_dict(membership.room, user_id)
        data["last_read_seq"] = membership.last_read_seq
        data["unread"] = max(0, membership.room.last_seq - membership.last_read_seq)
        result.append(data)
    return result


def public_rooms(user_id: int) -> list[dict[str, Any]]:
    mine = Membership.objects.filter(user_id=user_id).values("room_id")
    rooms = Room.objects.filter(kind=Room.Kind.GROUP, private=False).exclude(pk__in=mine).order_by("pk")[:100]
    return [room_dict(r) for r in rooms]


def mark_read(user_id: int, room_id: int, seq: int) -> int:
    """Move the read marker forward (never back, never past the last message)."""
    membership = Membership.objects.select_related("room").filter(room_id=room_id, user_id=user_id).first()
    if membership is None:
        require_member(user_id, room_id)
        raise AssertionError("unreachable")
    seq = min(seq, membership.room.last_seq)
    if seq > membership.last_read_seq:
        Membership.objects.filter(pk=membership.pk, last_read_seq__lt=seq).update(last_read_seq=seq)
        return seq
    return membership.last_read_seq


# --- reading messages ---------------------------------------------------------------------------


def _frames(queryset: Any) -> list[dict[str, Any]]:
    return [message_frame(m, m.sender.get_username() if m.sender else None) for m in queryset]


def messages_after_many(after: dict[int, int], limit: int) -> dict[int, list[dict[str, Any]]]:
    """For each room, its messages with seq > after[room], oldest first, at most `limit`: one
    query for all rooms (a window function numbers each room's rows), not one per room."""
    if not after:
        return {}
    condition = Q()
    for room_id, seq in after.items():
        condition |= Q(room_id=room_id, seq__gt=seq)
    rows = (
        Message.objects.filter(condition)
        .annotate(position=Window(RowNumber(), partition_by=[F("room_id")], order_by=F("seq").asc()))
        .filter(position__lte=limit)
        .select_related("sender")
        .order_by("room_id", "seq")
    )
    result: dict[int, list[dict[str, Any]]] = {room_id: [] for room_id in after}
    for frame in _frames(rows):
        result[frame["room"]].append(frame)
    return result


def last_seqs(room_ids: list[int]) -> dict[int, int]:
    return dict(Room.objects.filter(pk__in=room_ids).values_list("pk", "last_seq"))


def history(
    user_id: int, room_id: int, before_seq: int | None, limit: int, max_bytes: int | None = None
) -> tuple[list[dict], bool]:
    """A page of history, oldest first, and whether older messages exist.

    With `max_bytes`, the page holds only the newest messages whose JSON fits in that many bytes
    (at least one is always too many to fit only if a single message is: it is still sent), and
    `has_more` says that older ones remain: the client asks again with `before_seq`.
    """
    require_member(user_id, room_id)
    rows = Message.objects.filter(room_id=room_id).select_related("sender")
    if before_seq is not None:
        rows = rows.filter(seq__lt=before_seq)
    page = list(rows.order_by("-seq")[: limit + 1])
    has_more = len(page) > limit
    frames = _frames(page[:limit])  # newest first
    if max_bytes is not None:
        used = 0
        for count, frame in enumerate(frames):
            # +1 for the comma between array items
            used += len(json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()) + 1
            if used > max_bytes and count > 0:
                frames = frames[:count]
                has_more = True
                break
    return list(reversed(frames)), has_more


# --- storing messages ---------------------------------------------------------------------------


# The database itself is unreachable or broken: every message of the batch may succeed on a
# retry, so the batch fails as a whole (senders get `unavailable` and re-send).
TRANSIENT_ERRORS = (OperationalError, InterfaceError)


def store_batch(items: list[dict[str, Any]]) -> list[Outcome]:
    """Store a batch of messages through the ORM: dedupe retries, check membership, assign
    seqs, insert. The worker's PostgreSQL path is `chat.store_pg`; this one serves SQLite
    (`make run`) and callers outside the worker. The rules are `chat.batch_plan`'s.

    One transaction for the whole batch (rooms locked in id order so concurrent workers cannot
    deadlock). If anything about one item fails the batch (a concurrent worker stored the same
    retry first, a value the database refuses, a malformed item), the batch is retried one
    message per transaction: the item at fault gets a permanent error and the others are
    stored. A poison message never costs another user anything.
    """
    try:
        with transaction.atomic():
            return _store(items)
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        log.info("batch of %d failed (%s); storing its messages one by one", len(items), type(exc).__name__)
    outcomes = []
    for item in items:
        try:
            with transaction.atomic():
                outcomes.extend(_store([item]))
        except TRANSIENT_ERRORS:
            raise
        except IntegrityError:
            # A concurrent worker stored this very retry between our dedupe and our insert.
            outcomes.append(_stored_by_another(item))
        except Exception as exc:
            log.warning("message %r of user %r refused by the database: %s",
                        item.get("client_msg_id"), item.get("sender"), type(exc).__name__)
            outcomes.append(batch_plan.refused_by_database(item))
    return outcomes


def _stored_by_another(item: dict[str, Any]) -> Outcome:
    found = Message.objects.filter(sender_id=item["sender"], client_msg_id=item["client_msg_id"]).values_list(
        "room_id", "seq").first()
    return batch_plan.stored_by_another(item, found)


def _reserve_seqs(room_id: int, count: int) -> Reserved | None:
    """Lock the room and take `count` seqs in one statement.

    The row lock is held until the batch commits, so concurrent workers get consecutive,
    gap-free ranges. The ORM has no UPDATE ... RETURNING; PostgreSQL and SQLite >= 3.35 both do.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Room._meta.db_table} SET last_seq = last_seq + %s WHERE id = %s "
            "RETURNING last_seq, kind, bot_id",
            [count, room_id],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    last, kind, bot_id = int(row[0]), row[1], row[2]
    bot_user = Bot.objects.filter(pk=bot_id).values_list("user_id", flat=True).first() if bot_id else None
    return Reserved(last, kind, bot_id, bot_user)


def _store(items: list[dict[str, Any]]) -> list[Outcome]:
    # Four statements for a batch in one room (dedupe, membership with usernames, seqs, insert):
    # statements, not rows, are what a batch of one costs.
    senders, client_ids = batch_plan.keys_of(items)
    existing = {
        (m.sender_id, m.client_msg_id): stored_message(m, m.sender.get_username() if m.sender else None)
        for m in Message.objects.filter(sender_id__in=set(senders), client_msg_id__in=set(client_ids))
        .select_related("sender")
    }
    usernames: dict[int, str] = {}
    members: set[tuple[int, int]] = set()
    # Members only, and only active users: a deactivated account's queued sends are refused.
    for room_id, user_id, username in Membership.objects.filter(
        user_id__in=set(senders), room_id__in={item["room"] for item in items}, user__is_active=True
    ).values_list("room_id", "user_id", "user__username"):
        members.add((room_id, user_id))
        usernames[user_id] = username

    plan = batch_plan.plan_batch(items, existing, members)
    reserved = {}
    for room_id, count in plan.counts():
        got = _reserve_seqs(room_id, count)
        if got is not None:
            reserved[room_id] = got
    created_at = timezone.now()
    new = plan.new_messages(reserved, created_at, usernames)
    rows = Message.objects.bulk_create([
        Message(room_id=m.room, seq=m.seq, sender_id=m.sender, body=m.body, kind=m.kind, client_msg_id=m.client_msg_id)
        for _, m in new
    ])
    # auto_now_add stamps each row as it is saved: the frames carry the stored time.
    new = [(index, m._replace(created_at=row.created_at)) for (index, m), row in zip(new, rows, strict=True)]
    rooms_that_exist: set[int] = set()
    if plan.refused:
        rooms_that_exist = set(
            Room.objects.filter(pk__in={items[i]["room"] for i in plan.refused}).values_list("pk", flat=True)
        )
    return plan.finish(new, reserved, rooms_that_exist)
