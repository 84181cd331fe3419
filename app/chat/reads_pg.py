"""The protocol process's database reads on PostgreSQL, async on its own event loop.

Every handshake looks its token up, every `join` reads rooms and memberships, every `resume`
reads what the socket missed. Through the ORM these ran in asgiref's one database thread per
process, one at a time, each with a health-check round trip: about 4 ms of that thread per
connect and 6.5 ms per join, so a protocol process connected ~240 sockets/s and joined ~150/s
whatever its CPU (issue 11; the profile is in docs/benchmarks.md). Here each is one statement
on a connection of a small pool owned by the loop: the lookups of many sockets overlap, and
none waits for a thread.

The rules are the ORM path's (`chat.join_rules`, `chat.tokens`), which SQLite keeps using.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import cache
from typing import Any

import psycopg

from chat import batch_plan, join_rules, tokens
from chat.batch_plan import StoredMessage
from chat.coalesce import Coalescer
from chat.store_pg import TRANSIENT_ERRORS, connect, conninfo_from_django
from parley.config import CONFIG

# Keys per statement: a `resume` of the most rooms a connection may hold
# (PARLEY_MAX_ROOMS_PER_CONNECTION, 500 by default) fits in one, and a batch's arrays stay a few KB.
MAX_BATCH = 500
# Statements of one kind in flight at once. One: what arrives while it runs waits and goes out
# together in the next, so in a storm every statement carries many sockets' questions. With 4,
# the first questions went out nearly alone and a 5,000-socket resume took 29.5 s of the
# process's CPU instead of 18.6 s (docs/benchmarks.md). Kinds run side by side, on the pool.
LANES = 1
# A read that finds no free connection within this many seconds fails as `unavailable`
# instead of holding its socket's frame (and the client) indefinitely.
ACQUIRE_TIMEOUT = 5.0


class DatabaseUnavailable(Exception):
    """The database is unreachable, or every connection stayed busy: retry later."""


@cache
def _sql() -> dict[str, str]:
    """The statements, with table names from the models (read once Django is set up). Each
    answers a batch of lookups (`chat.coalesce`): its keys come as arrays, and each row says
    which key it answers."""
    from django.contrib.auth import get_user_model

    from chat.models import ApiToken, Membership, Message, Room

    token, user, room = ApiToken._meta.db_table, get_user_model()._meta.db_table, Room._meta.db_table
    membership, message = Membership._meta.db_table, Message._meta.db_table
    pairs = ", ".join(f"'{kind}'" for kind in join_rules.PAIR_KINDS)
    return {
        # The live tokens of active users, and `last_used` written where it is stale (a
        # data-modifying WITH runs whether or not the SELECT reads it): one round trip.
        "tokens": (
            f"WITH t AS (SELECT k.key_hash, k.id, k.user_id, u.username, k.expires_at, k.last_used FROM {token} k "
            f"JOIN {user} u ON u.id = k.user_id AND u.is_active "
            f"WHERE k.key_hash = ANY(%(hashes)s::text[]) AND k.expires_at > %(now)s), "
            f"touched AS (UPDATE {token} SET last_used = %(now)s FROM t WHERE {token}.id = t.id "
            f"AND (t.last_used IS NULL OR t.last_used <= %(stale)s) RETURNING 1) "
            f"SELECT key_hash, id, user_id, username, expires_at FROM t"
        ),
        # Each (user, room) pair: the room as that user sees it, with the user's membership and
        # the other member of a DM or bot chat the user is in.
        "rooms": (
            f"SELECT k.user_id, r.id, r.name, r.kind, r.private, r.last_seq, m.last_read_seq, p.user_id, p.username "
            f"FROM unnest(%(users)s::bigint[], %(rooms)s::bigint[]) AS k(user_id, room_id) "
            f"JOIN {room} r ON r.id = k.room_id "
            f"LEFT JOIN {membership} m ON m.room_id = r.id AND m.user_id = k.user_id "
            f"LEFT JOIN LATERAL (SELECT o.user_id, u.username FROM {membership} o JOIN {user} u ON u.id = o.user_id "
            f"WHERE m.id IS NOT NULL AND r.kind IN ({pairs}) AND o.room_id = r.id AND o.user_id <> k.user_id "
            f"ORDER BY o.id LIMIT 1) p ON true"
        ),
        "add_members": (
            f"INSERT INTO {membership} (user_id, room_id, joined_at, last_read_seq) "
            f"SELECT user_id, room_id, %(now)s, 0 FROM unnest(%(users)s::bigint[], %(rooms)s::bigint[]) "
            f"AS k(user_id, room_id) ON CONFLICT DO NOTHING"
        ),
        "last_seqs": f"SELECT id, last_seq FROM {room} WHERE id = ANY(%s::bigint[])",
        # Per (room, seq, limit): the first `limit` messages after that seq, from the (room,
        # seq) index: a room far behind costs `limit` rows, not all it missed.
        "after": (
            f"SELECT a.after, a.lim, m.room_id, m.seq, m.sender_id, u.username, m.body, m.kind, m.created_at, "
            f"m.client_msg_id "
            f"FROM unnest(%(rooms)s::bigint[], %(after)s::bigint[], %(limits)s::int[]) AS a(room_id, after, lim) "
            f"CROSS JOIN LATERAL (SELECT * FROM {message} x WHERE x.room_id = a.room_id AND x.seq > a.after "
            f"ORDER BY x.seq LIMIT a.lim) m "
            f"LEFT JOIN {user} u ON u.id = m.sender_id ORDER BY m.room_id, a.after, m.seq"
        ),
    }


class ConnectionPool:
    """Up to `size` connections of one event loop, made when needed, dropped when broken.

    Connections stay open while idle: a protocol process reads all the time, and one open
    connection costs the database little (docs/operations.md sizes `max_connections`).
    """

    def __init__(self, conninfo: str, size: int) -> None:
        self.conninfo = conninfo
        self.idle: list[psycopg.AsyncConnection[Any]] = []
        self.slots = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self.slots.locked():
            try:
                await asyncio.wait_for(self.slots.acquire(), ACQUIRE_TIMEOUT)
            except TimeoutError:
                raise DatabaseUnavailable("every database connection stayed busy") from None
        else:
            await self.slots.acquire()  # free: no timer (wait_for costs a task per call)
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = self.idle.pop() if self.idle else await connect(self.conninfo)
            yield conn
        except TRANSIENT_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            # Cancelled mid-statement, or an error we do not know the connection's state after.
            if conn is not None:
                await _close_quietly(conn)
                conn = None
            raise
        finally:
            if conn is not None and not conn.closed and not conn.broken:
                self.idle.append(conn)
            self.slots.release()

    def abandon(self) -> None:
        """Close every idle connection now (its loop is gone: nothing can be awaited on it)."""
        for conn in self.idle:
            conn.pgconn.finish()
        self.idle.clear()

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            await _close_quietly(conn)


async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        await conn.close()


class Reads:
    """One event loop's connections, and its lookups batched across sockets (`chat.coalesce`)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = ConnectionPool(conninfo_from_django("parley-protocol"), CONFIG.protocol_db_connections)
        self.tokens = Coalescer(self._tokens, LANES, MAX_BATCH)
        self.rooms = Coalescer(self._rooms, LANES, MAX_BATCH)
        self.new_members = Coalescer(self._add_members, LANES, MAX_BATCH)
        self.seqs = Coalescer(self._last_seqs, LANES, MAX_BATCH)
        self.after = Coalescer(self._after, LANES, MAX_BATCH)

    async def _tokens(self, hashes: list[str]) -> dict[str, tuple[int, int, str, datetime]]:
        now = datetime.now(UTC)
        rows = await _rows(_sql()["tokens"], {"hashes": hashes, "now": now, "stale": tokens.stale_before(now)})
        return {row[0]: row[1:] for row in rows}

    async def _rooms(self, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], join_rules.RoomFacts]:
        users, rooms = zip(*pairs, strict=True)
        rows = await _rows(_sql()["rooms"], {"users": list(users), "rooms": list(rooms)})
        return {(row[0], row[1]): join_rules.RoomFacts(*row[1:]) for row in rows}

    async def _add_members(self, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], None]:
        users, rooms = zip(*pairs, strict=True)
        await _rows(_sql()["add_members"], {"users": list(users), "rooms": list(rooms), "now": datetime.now(UTC)})
        return {}

    async def _last_seqs(self, rooms: list[int]) -> dict[int, int]:
        return {room: seq for room, seq in await _rows(_sql()["last_seqs"], (rooms,))}

    async def _after(self, keys: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], list[dict[str, Any]]]:
        rooms, after, limits = (list(column) for column in zip(*keys, strict=True))
        found: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
        for row in await _rows(_sql()["after"], {"rooms": rooms, "after": after, "limits": limits}):
            message = StoredMessage._make(row[2:])
            found.setdefault((message.room, row[0], row[1]), []).append(batch_plan.message_frame(message))
        return found


_reads: Reads | None = None


def current() -> Reads:
    """The running loop's reads (a loop per process in production; one per test under pytest)."""
    global _reads
    loop = asyncio.get_running_loop()
    if _reads is None or _reads.loop is not loop:
        if _reads is not None:
            _reads.pool.abandon()
        _reads = Reads()
    return _reads


async def close() -> None:
    global _reads
    if _reads is not None:
        await _reads.pool.close()
        _reads = None


async def _rows(sql: str, params: Any) -> list[tuple[Any, ...]]:
    """One statement on a pooled connection: its rows (none for a statement without any)."""
    async with current().pool.connection() as conn:
        cursor = await conn.execute(sql, params)
        return await cursor.fetchall() if cursor.description is not None else []


async def lookup_token(key_hash: str) -> tokens.TokenInfo | None:
    """`chat.tokens.lookup`: a hash the cache did not know, batched with other handshakes'."""
    return tokens.remember(key_hash, await current().tokens.get(key_hash))


async def join_rooms(user_id: int, room_ids: list[int]) -> dict[int, join_rules.Answer]:
    """`chat.services.join_rooms`: one statement for many sockets' joins (and one more for the
    public groups joined for the first time)."""
    reads = current()
    found = await reads.rooms.get_many((user_id, room) for room in room_ids)
    facts = {room: fact for (_, room), fact in found.items() if fact is not None}
    answers, new_member_of = join_rules.answer_joins(room_ids, facts)
    if new_member_of:
        await reads.new_members.get_many((user_id, room) for room in new_member_of)
    return answers


async def last_seqs(room_ids: list[int]) -> dict[int, int]:
    found = await current().seqs.get_many(room_ids)
    return {room: seq for room, seq in found.items() if seq is not None}


async def messages_after_many(after: dict[int, int], limit: int) -> dict[int, list[dict[str, Any]]]:
    """`chat.services.messages_after_many`; the frame lists may be shared with other sockets
    that asked the same (read them, do not change them)."""
    found = await current().after.get_many((room, seq, limit) for room, seq in after.items())
    return {room: frames or [] for (room, _, _), frames in found.items()}
