"""The worker's store path on PostgreSQL: async psycopg on the worker's own event loop.

The ORM path (`chat.services.store_batch`) runs in asgiref's database thread: every batch is a
thread hop, and the GIL hand-off between the event loop and that thread cost the worker about
two thirds of its core (issue 11: ~2,700 futex calls/s at 1,000 messages/s). Here a batch is
two set-based statements on a connection of the loop's own, whatever its size or its number of
rooms:

1. what the batch needs to know, in one read: the messages already stored under its
   `(sender, client_msg_id)` keys (retries), and which senders are active members of the rooms
   they write to, with their usernames;
2. the write, in one statement (so one transaction, in autocommit): the batch's rooms locked in
   id order (so that concurrent workers cannot deadlock), their seqs reserved with one UPDATE
   (`last_seq + n ... RETURNING`), and the rows inserted from arrays (`INSERT ... SELECT FROM
   unnest(...)`) with seqs counted back from what the UPDATE returned.

Why two and not the six of a pipelined transaction (BEGIN, two reads, reserve, insert, COMMIT):
a statement costs psycopg ~170-250 us of CPU here whatever it carries (`SELECT 1` included), so
a batch of one message cost the worker 2.2 ms, and a worker at 400 messages/s in batches of a
few spent a third of a core on it (`docs/benchmarks.md`). A read outside the write's
transaction changes nothing the transaction protected: a retry stored by another worker in
between still fails the insert on the unique key, and the batch is planned again.

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
        # One read: the stored messages under the batch's keys ('e' rows), then the (room, user)
        # pairs of active members among its senders and rooms, with usernames ('m' rows).
        # Members only, and only active users: a deactivated account's queued sends are refused.
        "facts": (
            f"SELECT 'e', m.room_id, m.seq, m.sender_id, u.username, m.body, m.kind, m.created_at, m.client_msg_id "
            f"FROM unnest(%(senders)s::bigint[], %(client_ids)s::text[]) AS k(sender_id, client_msg_id) "
            f"JOIN {message} m ON m.sender_id = k.sender_id AND m.client_msg_id = k.client_msg_id "
            f"LEFT JOIN {user} u ON u.id = m.sender_id "
            f"UNION ALL "
            f"SELECT 'm', mb.room_id, NULL::integer, mb.user_id, u.username, NULL::text, NULL::text, "
            f"NULL::timestamptz, NULL::text "
            f"FROM (SELECT DISTINCT room_id, user_id FROM unnest(%(rooms)s::bigint[], %(senders)s::bigint[]) "
            f"AS p(room_id, user_id)) k "
            f"JOIN {membership} mb ON mb.room_id = k.room_id AND mb.user_id = k.user_id "
            f"JOIN {user} u ON u.id = mb.user_id AND u.is_active"
        ),
        # One write. The rooms' rows are locked in id order (the sorted FOR UPDATE subquery locks
        # each row as the sort hands it out) before the UPDATE writes them, whatever order its
        # plan reads them in: two workers with overlapping rooms wait for each other, never
        # deadlock. A room's rows take the seqs `last_seq - n + 1 .. last_seq` of the UPDATE's
        # new `last_seq`, in the order of their `pos` (1..n within the room); a room gone since
        # the read has no reservation, and its rows are not inserted.
        "store": (
            f"WITH counts AS (SELECT * FROM unnest(%(ids)s::bigint[], %(ns)s::bigint[]) AS c(id, n)), "
            f"reserved AS (UPDATE {room} r SET last_seq = r.last_seq + c.n "
            f"FROM (SELECT id FROM {room} WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id FOR UPDATE) l "
            f"JOIN counts c ON c.id = l.id WHERE r.id = l.id "
            f"RETURNING r.id, r.last_seq, r.kind, r.bot_id, "
            f"(SELECT b.user_id FROM {bot} b WHERE b.id = r.bot_id) AS bot_user, c.n), "
            f"inserted AS (INSERT INTO {message} (room_id, seq, sender_id, body, kind, client_msg_id, created_at) "
            f"SELECT v.room_id, r.last_seq - r.n + v.pos, v.sender_id, v.body, v.kind, v.client_msg_id, "
            f"%(created_at)s::timestamptz "
            f"FROM unnest(%(rooms)s::bigint[], %(pos)s::bigint[], %(senders)s::bigint[], %(bodies)s::text[], "
            f"%(kinds)s::text[], %(client_ids)s::text[]) AS v(room_id, pos, sender_id, body, kind, client_msg_id) "
            f"JOIN reserved r ON r.id = v.room_id) "
            f"SELECT id, last_seq, kind, bot_id, bot_user FROM reserved"
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
        sql = _sql()
        senders, client_ids = batch_plan.keys_of(items)
        cursor = await conn.execute(sql["facts"], {
            "senders": senders, "client_ids": client_ids, "rooms": [item["room"] for item in items],
        })
        existing: dict[tuple[int, str], StoredMessage] = {}
        members: set[tuple[int, int]] = set()
        usernames: dict[int, str] = {}
        for tag, *row in await cursor.fetchall():
            if tag == "e":
                found = StoredMessage._make(row)
                existing[(found.sender, found.client_msg_id)] = found
            else:
                room, _seq, user, username = row[:4]
                members.add((room, user))
                usernames[user] = username

        plan = batch_plan.plan_batch(items, existing, members)
        reserved: dict[int, Reserved] = {}
        created_at = datetime.now(UTC)
        counts = plan.counts()
        if counts:
            rows = [(room, pos, items[index]) for room, _ in counts
                    for pos, index in enumerate(plan.per_room[room], start=1)]
            cursor = await conn.execute(sql["store"], {
                "ids": [room for room, _ in counts], "ns": [n for _, n in counts], "created_at": created_at,
                "rooms": [room for room, _, _ in rows], "pos": [pos for _, pos, _ in rows],
                "senders": [item["sender"] for _, _, item in rows], "bodies": [item["body"] for _, _, item in rows],
                "kinds": [item.get("kind", batch_plan.TEXT_MESSAGE) for _, _, item in rows],
                "client_ids": [item["client_msg_id"] for _, _, item in rows],
            })
            for room, last, kind, bot, bot_user in await cursor.fetchall():
                reserved[room] = Reserved(int(last), kind, bot, bot_user)
        # The rows the statement inserted, with the same seqs (rooms without a reservation: refused).
        new = plan.new_messages(reserved, created_at, usernames)
        rooms_that_exist: set[int] = set()
        if plan.refused:
            cursor = await conn.execute(sql["rooms_exist"], (list({items[i]["room"] for i in plan.refused}),))
            rooms_that_exist = {row[0] for row in await cursor.fetchall()}
        return plan.finish(new, reserved, rooms_that_exist)
