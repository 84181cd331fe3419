"""The worker's store path on PostgreSQL: async psycopg on the worker's own event loop.

The ORM path (`chat.services.store_batch`) runs in asgiref's database thread: every batch is a
thread hop, and the GIL hand-off between the event loop and that thread cost the worker about
two thirds of its core (issue 11: ~2,700 futex calls/s at 1,000 messages/s). Here a batch is
four set-based statements on a connection of the loop's own, whatever its size or its number
of rooms, sent in pipeline mode (three round trips with BEGIN and COMMIT):

1. the messages already stored under the batch's `(sender, client_msg_id)` keys (retries);
2. which senders are active members of the rooms they write to, with their usernames;
3. the batch's rooms locked in id order (so that concurrent workers cannot deadlock) and their
   seqs reserved, one UPDATE for every room (`last_seq + n ... RETURNING`);
4. the rows inserted from arrays (`INSERT ... SELECT FROM unnest(...)`).

What each item becomes is decided by `chat.batch_plan`, the same rules as the ORM path.
Failures follow `services.store_batch`'s contract: a broken or unreachable database fails the
whole batch (senders get `unavailable` and retry); anything else about one item is isolated by
storing the batch again one message per transaction, so a poison message costs nobody else.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import cache
from typing import Any

import psycopg
from psycopg import errors

from chat import batch_plan
from chat.batch_plan import Outcome, Reserved, StoredMessage

log = logging.getLogger(__name__)

# The database is unreachable or the connection broke: the whole batch may succeed on a retry.
TRANSIENT_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
# How long to wait for a connection before the batch fails as `unavailable` (seconds).
CONNECT_TIMEOUT = 5


@cache
def _sql() -> dict[str, str]:
    """The statements, with table names from the models (read once Django is set up)."""
    from django.contrib.auth import get_user_model

    from chat.models import Bot, Membership, Message, Room

    message, room = Message._meta.db_table, Room._meta.db_table
    membership, user, bot = Membership._meta.db_table, get_user_model()._meta.db_table, Bot._meta.db_table
    return {
        "existing": (
            f"SELECT m.room_id, m.seq, m.sender_id, u.username, m.body, m.kind, m.created_at, m.client_msg_id "
            f"FROM unnest(%s::bigint[], %s::text[]) AS k(sender_id, client_msg_id) "
            f"JOIN {message} m ON m.sender_id = k.sender_id AND m.client_msg_id = k.client_msg_id "
            f"LEFT JOIN {user} u ON u.id = m.sender_id"
        ),
        # Members only, and only active users: a deactivated account's queued sends are refused.
        "members": (
            f"SELECT mb.room_id, mb.user_id, u.username "
            f"FROM (SELECT DISTINCT room_id, user_id FROM unnest(%s::bigint[], %s::bigint[]) AS p(room_id, user_id)) k "
            f"JOIN {membership} mb ON mb.room_id = k.room_id AND mb.user_id = k.user_id "
            f"JOIN {user} u ON u.id = mb.user_id AND u.is_active"
        ),
        # The rooms' rows are locked in id order (the sorted FOR UPDATE subquery locks each row
        # as the sort hands it out) before the UPDATE writes them, whatever order its plan
        # reads them in: two workers with overlapping rooms wait for each other, never deadlock.
        "reserve": (
            f"UPDATE {room} r SET last_seq = r.last_seq + c.n "
            f"FROM (SELECT id FROM {room} WHERE id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE) l "
            f"JOIN unnest(%s::bigint[], %s::bigint[]) AS c(id, n) ON c.id = l.id WHERE r.id = l.id "
            f"RETURNING r.id, r.last_seq, r.kind, r.bot_id, (SELECT b.user_id FROM {bot} b WHERE b.id = r.bot_id)"
        ),
        "insert": (
            f"INSERT INTO {message} (room_id, seq, sender_id, body, kind, client_msg_id, created_at) "
            f"SELECT room_id, seq, sender_id, body, kind, client_msg_id, %s::timestamptz "
            f"FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[]) "
            f"AS v(room_id, seq, sender_id, body, kind, client_msg_id)"
        ),
        "rooms_exist": f"SELECT id FROM {room} WHERE id = ANY(%s::bigint[])",
        "stored_by_another": (
            f"SELECT room_id, seq FROM {message} WHERE sender_id = %s AND client_msg_id = %s"
        ),
    }


def conninfo_from_django(application_name: str = "parley-worker", alias: str = "default") -> str:
    """The connection string of Django's database `alias` (the test database under pytest),
    named in `pg_stat_activity` as `application_name`."""
    from django.db import connections

    settings = connections[alias].settings_dict
    params: dict[str, Any] = {
        "dbname": settings["NAME"],
        "user": settings.get("USER") or None,
        "password": settings.get("PASSWORD") or None,
        "host": settings.get("HOST") or None,
        "port": settings.get("PORT") or None,
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": application_name,
    }
    for key, value in (settings.get("OPTIONS") or {}).items():
        if isinstance(value, str | int):  # libpq options (sslmode, ...); not Django's own objects
            params[key] = value
    return psycopg.conninfo.make_conninfo(**{k: v for k, v in params.items() if v is not None})


async def connect(conninfo: str) -> psycopg.AsyncConnection[Any]:
    """A connection of the async paths (this store, `chat.reads_pg`): autocommit, timestamps
    read back in UTC as Django's connections read them."""
    conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    await conn.execute("SET TIME ZONE 'UTC'")
    return conn


class PgStore:
    """Stores batches on one connection of its own (one store per worker lane)."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = await connect(self.conninfo)
        return self.conn

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None

    async def store_batch(self, items: list[dict[str, Any]]) -> list[Outcome]:
        conn = await self._connection()
        for attempt in (1, 2):
            try:
                return await self._store(conn, items)
            except TRANSIENT_ERRORS:
                await self.close()
                raise
            except errors.UniqueViolation:
                if attempt == 2:
                    break
                # A concurrent worker stored one of these retries between our dedupe and our
                # insert (the rollback returned the seqs): once more, its row is now a duplicate.
                log.info("batch of %d raced another worker; storing it again", len(items))
            except psycopg.Error as exc:
                log.info("batch of %d failed (%s); storing its messages one by one", len(items), type(exc).__name__)
                break
        return await self._one_by_one(conn, items)

    async def _one_by_one(self, conn: psycopg.AsyncConnection[Any], items: list[dict[str, Any]]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for item in items:
            try:
                outcomes.extend(await self._store(conn, [item]))
            except TRANSIENT_ERRORS:
                await self.close()
                raise
            except errors.UniqueViolation:
                outcomes.append(await self._stored_by_another(conn, item))
            except psycopg.Error as exc:
                log.warning("message %r of user %r refused by the database: %s",
                            item.get("client_msg_id"), item.get("sender"), type(exc).__name__)
                outcomes.append(batch_plan.refused_by_database(item))
        return outcomes

    async def _stored_by_another(self, conn: psycopg.AsyncConnection[Any], item: dict[str, Any]) -> Outcome:
        cursor = await conn.execute(_sql()["stored_by_another"], (item["sender"], item["client_msg_id"]))
        return batch_plan.stored_by_another(item, await cursor.fetchone())

    async def _store(self, conn: psycopg.AsyncConnection[Any], items: list[dict[str, Any]]) -> list[Outcome]:
        # Pipeline mode: statements go out without waiting for the previous answer, and a batch
        # costs three round trips (BEGIN + reads, the seqs, the insert + COMMIT), not seven.
        sql = _sql()
        senders, client_ids = batch_plan.keys_of(items)
        rooms = [item["room"] for item in items]
        async with conn.pipeline(), conn.transaction():
            found_cursor = await conn.execute(sql["existing"], (senders, client_ids))
            members_cursor = await conn.execute(sql["members"], (rooms, senders))
            found = map(StoredMessage._make, await found_cursor.fetchall())
            existing = {(row.sender, row.client_msg_id): row for row in found}
            members: set[tuple[int, int]] = set()
            usernames: dict[int, str] = {}
            for room, user, username in await members_cursor.fetchall():
                members.add((room, user))
                usernames[user] = username

            plan = batch_plan.plan_batch(items, existing, members)
            reserved: dict[int, Reserved] = {}
            counts = plan.counts()
            exist_cursor = None
            if plan.refused:
                refused_rooms = list({items[i]["room"] for i in plan.refused})
                exist_cursor = await conn.execute(sql["rooms_exist"], (refused_rooms,))
            if counts:
                ids = [room for room, _ in counts]
                reserve_cursor = await conn.execute(sql["reserve"], (ids, ids, [n for _, n in counts]))
                for room, last, kind, bot, bot_user in await reserve_cursor.fetchall():
                    reserved[room] = Reserved(int(last), kind, bot, bot_user)
            created_at = datetime.now(UTC)
            new = plan.new_messages(reserved, created_at, usernames)
            if new:
                rows = [m for _, m in new]
                await conn.execute(sql["insert"], (
                    created_at, [m.room for m in rows], [m.seq for m in rows], [m.sender for m in rows],
                    [m.body for m in rows], [m.kind for m in rows], [m.client_msg_id for m in rows],
                ))
            rooms_that_exist: set[int] = set()
            if exist_cursor is not None:
                rooms_that_exist = {row[0] for row in await exist_cursor.fetchall()}
        return plan.finish(new, reserved, rooms_that_exist)
