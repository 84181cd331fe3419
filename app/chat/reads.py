"""What the protocol path reads from the database, awaited on the event loop.

On PostgreSQL (and PARLEY_STORE=auto) the reads run async on the process's own loop
(`chat.reads_pg`); elsewhere (SQLite for `make run`, or PARLEY_STORE=orm) through the ORM in
asgiref's database thread. Both raise `DatabaseUnavailable` when the database cannot answer,
so the consumer can tell its client to retry instead of reporting an internal error.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from channels.db import database_sync_to_async
from django.db import InterfaceError, OperationalError

from chat import join_rules, reads_pg, services, tokens
from chat.reads_pg import DatabaseUnavailable
from parley.config import CONFIG

__all__ = ["DatabaseUnavailable", "find_token", "join_rooms", "last_seqs", "messages_after_many"]


async def _in_thread(function: Any, *args: Any) -> Any:
    try:
        return await database_sync_to_async(function)(*args)
    except (OperationalError, InterfaceError) as exc:
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc


class OrmReads:
    """The same reads through the ORM, one at a time in asgiref's database thread."""

    async def lookup_token(self, key_hash: str) -> tokens.TokenInfo | None:
        return await _in_thread(tokens.lookup, key_hash)

    async def join_rooms(self, user_id: int, room_ids: list[int]) -> dict[int, join_rules.Answer]:
        return await _in_thread(services.join_rooms, user_id, room_ids)

    async def last_seqs(self, room_ids: list[int]) -> dict[int, int]:
        return await _in_thread(services.last_seqs, room_ids)

    async def messages_after_many(self, after: dict[int, int], limit: int) -> dict[int, list[dict[str, Any]]]:
        return await _in_thread(services.messages_after_many, after, limit)


@cache
def backend() -> Any:
    """`chat.reads_pg` (its functions have the same names and signatures) or `OrmReads`."""
    from django.db import connection

    if connection.vendor == "postgresql" and CONFIG.store == "auto":
        return reads_pg
    return OrmReads()


async def find_token(plaintext: str) -> tokens.TokenInfo | None:
    """`chat.tokens.find_token`: a cached answer costs no statement and no thread hop."""
    key_hash, hit, info = tokens.cached(plaintext)
    if hit or key_hash is None:
        return info
    return await backend().lookup_token(key_hash)


async def join_rooms(user_id: int, room_ids: list[int]) -> dict[int, join_rules.Answer]:
    return await backend().join_rooms(user_id, room_ids)


async def last_seqs(room_ids: list[int]) -> dict[int, int]:
    return await backend().last_seqs(room_ids)


async def messages_after_many(after: dict[int, int], limit: int) -> dict[int, list[dict[str, Any]]]:
    return await backend().messages_after_many(after, limit)
