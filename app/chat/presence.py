"""Who is online in a room: best effort, self-healing.

Each protocol process counts its local (room, user) connections. The first local connection of a
user in a room publishes `presence online`, the last one `offline`. The room's online set is a
Redis sorted set `parley:presence:<room>` scored by expiry time; each process refreshes its
local entries with its heartbeat, so a crashed process's users fall out after the TTL.
"""

from __future__ import annotations

import time
from collections import Counter

from chat.redis_pool import client_for
from parley.config import CONFIG


def presence_key(room: int) -> str:
    # Keep presence on the room's shard (same hash input as the room topic).
    return f"parley:presence:{room}"


def _shard_key(room: int) -> str:
    return f"parley:room:{room}"


def _member(user: int, username: str) -> str:
    # Usernames cannot contain ":" (Django's validator), so "<id>:<name>" splits unambiguously.
    return f"{user}:{username}"


class PresenceBook:
    def __init__(self) -> None:
        self.local: Counter[tuple[int, int]] = Counter()
        self.names: dict[int, str] = {}

    def arrive(self, room: int, user: int, username: str) -> bool:
        """Count a connection in; True when it is the user's first here."""
        self.names[user] = username
        self.local[(room, user)] += 1
        return self.local[(room, user)] == 1

    def depart(self, room: int, user: int) -> bool:
        """Count a connection out; True when it was the user's last here."""
        self.local[(room, user)] -= 1
        if self.local[(room, user)] <= 0:
            del self.local[(room, user)]
            return True
        return False

    @staticmethod
    def _ttl() -> float:
        return CONFIG.heartbeat_ttl

    async def mark_online(self, room: int, user: int, username: str) -> None:
        member = _member(user, username)
        await client_for(_shard_key(room)).zadd(presence_key(room), {member: time.time() + self._ttl()})

    async def mark_offline(self, room: int, user: int, username: str) -> None:
        await client_for(_shard_key(room)).zrem(presence_key(room), _member(user, username))

    @staticmethod
    async def online(room: int) -> list[dict[str, int | str]]:
        """Users online in the room, as `{"id", "username"}`, ordered by id."""
        client = client_for(_shard_key(room))
        members = await client.zrangebyscore(presence_key(room), time.time(), "+inf")
        users = []
        for member in members:
            user_id, _, username = member.decode().partition(":")
            users.append({"id": int(user_id), "username": username})
        return sorted(users, key=lambda u: u["id"])

    async def beat(self) -> None:
        """Refresh every local entry (called from the process heartbeat)."""
        expires = time.time() + self._ttl()
        by_room: dict[int, dict[str, float]] = {}
        for room, user in list(self.local):
            by_room.setdefault(room, {})[_member(user, self.names.get(user, ""))] = expires
        for room, entries in by_room.items():
            client = client_for(_shard_key(room))
            pipe = client.pipeline(transaction=False)
            pipe.zadd(presence_key(room), entries)
            pipe.zremrangebyscore(presence_key(room), "-inf", time.time())
            pipe.expire(presence_key(room), int(self._ttl() * 4))
            await pipe.execute()


PRESENCE = PresenceBook()
