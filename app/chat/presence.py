"""Who is online in a room: best effort, self-healing.

Each protocol process counts its local (room, user) connections. The first local connection of a
user in a room publishes `presence online`, the last one `offline`. The room's online set is a
Redis sorted set `<prefix>:presence:<room>` (`chat.contract`) scored by expiry time; each process refreshes its
local entries with its heartbeat, so a crashed process's users fall out after the TTL.

In a crowded room (PARLEY_PRESENCE_MAX users online or more) arrivals and departures are not
announced: each would be a frame to every member, members² frames for a room's reconnect storm.
Its `joined` frames list PARLEY_PRESENCE_MAX users and give the count.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import NamedTuple

from chat.contract import presence_key, room_topic
from chat.redis_pool import client_for
from parley.config import CONFIG


def _shard_key(room: int) -> str:
    # Keep presence on the room's shard (same hash input as the room topic).
    return room_topic(room)


def _member(user: int, username: str) -> str:
    # Usernames cannot contain ":" (Django's validator), so "<id>:<name>" splits unambiguously.
    return f"{user}:{username}"


class Online(NamedTuple):
    """Who is online in a room: up to PARLEY_PRESENCE_MAX users (ordered by id), and how many."""

    users: list[dict[str, int | str]]
    count: int

    @property
    def crowded(self) -> bool:
        """Too many online for live presence frames (PARLEY_PRESENCE_MAX, `parley.config`)."""
        return self.count >= CONFIG.presence_max


class PresenceBook:
    def __init__(self) -> None:
        self.local: Counter[tuple[int, int]] = Counter()
        # Usernames of users with at least one local (room, user) entry, freed with the last one:
        # a long-lived process must not keep every user it ever saw.
        self.names: dict[int, str] = {}
        self._entries: Counter[int] = Counter()

    def arrive(self, room: int, user: int, username: str) -> bool:
        """Count a connection in; True when it is the user's first here."""
        self.local[(room, user)] += 1
        first = self.local[(room, user)] == 1
        if first:
            self.names[user] = username
            self._entries[user] += 1
        return first

    def depart(self, room: int, user: int) -> bool:
        """Count a connection out; True when it was the user's last here."""
        if self.local.get((room, user), 0) <= 0:
            return False
        self.local[(room, user)] -= 1
        if self.local[(room, user)] <= 0:
            del self.local[(room, user)]
            self._entries[user] -= 1
            if self._entries[user] <= 0:
                del self._entries[user]
                self.names.pop(user, None)
            return True
        return False

    @staticmethod
    def _ttl() -> float:
        return CONFIG.heartbeat_ttl

    async def mark_online_many(self, rooms: list[int], user: int, username: str) -> None:
        member = {_member(user, username): time.time() + self._ttl()}
        by_shard: dict[int, list[int]] = {}
        for room in rooms:
            by_shard.setdefault(id(client_for(_shard_key(room))), []).append(room)
        for shard_rooms in by_shard.values():
            pipe = client_for(_shard_key(shard_rooms[0])).pipeline(transaction=False)
            for room in shard_rooms:
                pipe.zadd(presence_key(room), member)
            await pipe.execute()

    async def mark_offline(self, room: int, user: int, username: str) -> None:
        await client_for(_shard_key(room)).zrem(presence_key(room), _member(user, username))

    @staticmethod
    async def online(room: int) -> Online:
        return (await PresenceBook.online_many([room]))[room]

    @staticmethod
    async def online_many(rooms: list[int]) -> dict[int, Online]:
        """`Online` of many rooms in one pipelined round trip per shard (a 500-room `resume`).
        At most PARLEY_PRESENCE_MAX users are read per room, whatever its size."""
        by_shard: dict[int, list[int]] = {}
        for room in rooms:
            by_shard.setdefault(id(client_for(_shard_key(room))), []).append(room)
        now = time.time()
        most = CONFIG.presence_max
        result: dict[int, Online] = {}
        for shard_rooms in by_shard.values():
            pipe = client_for(_shard_key(shard_rooms[0])).pipeline(transaction=False)
            for room in shard_rooms:
                pipe.zrangebyscore(presence_key(room), now, "+inf", start=0, num=most)
                pipe.zcount(presence_key(room), now, "+inf")
            answers = await pipe.execute()
            for index, room in enumerate(shard_rooms):
                members, count = answers[2 * index], answers[2 * index + 1]
                users = []
                for member in members:
                    user_id, _, username = member.decode(errors="replace").partition(":")
                    if user_id.isdigit():  # anything else was not written by Parley: skip it
                        users.append({"id": int(user_id), "username": username})
                result[room] = Online(sorted(users, key=lambda u: u["id"]), max(count, len(users)))
        return result

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
