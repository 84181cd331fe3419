"""Who is online in a room: best effort, self-healing, and quiet through reconnect storms.

Each protocol process counts its local (room, user) connections. The room's online set is a
Redis sorted set `<prefix>:presence:<room>` (`chat.contract`) scored by expiry time; each process
refreshes its local entries with its heartbeat, so a crashed process's users fall out after the
TTL.

- **Arrival**: the first local connection of a user in a room adds the user to the set, and
  `presence online` is published only if the set did not hold the user already (ZADD said new).
- **Departure**: the last local connection's leaving is *not* announced at once. After
  PARLEY_PRESENCE_GRACE_SECONDS a sweep removes the user from the set and publishes `offline`,
  unless the user is back meanwhile, here or on any process (its entry was refreshed after
  the departure: compared in one Lua call).

So a user whose socket drops and comes back (a network blip, a drained pod whose clients
reconnect elsewhere within the jittered delay) costs the room no frame at all, where it cost
two per member: for 10,000 sockets in rooms of 20, 19 members times 2 frames each, 380,000.

In a crowded room (PARLEY_PRESENCE_MAX users online or more) nothing is announced: each frame
would go to every member. Its `joined` frames list PARLEY_PRESENCE_MAX users and give the count.

- **Announcing**: a room's changes are gathered for PARLEY_PRESENCE_BATCH_MS and go out as one
  frame per status listing the users (`Announcements`): a room whose 20 members come online
  together costs each member one frame, not twenty.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import NamedTuple, TypeVar

from redis.exceptions import RedisError

from chat.coalesce import Coalescer
from chat.contract import presence_key, room_topic
from chat.protocol import dumps
from chat.redis_pool import client_for
from parley.config import CONFIG

log = logging.getLogger(__name__)


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


class Leaving(NamedTuple):
    """A departure waiting for its grace period (`PresenceBook.leave_later`)."""

    due: float  # monotonic
    bound: float  # the latest expiry this process may have written for the entry
    room: int
    user: int
    username: str
    announce: bool  # False in a crowded room


# Remove the member unless its expiry is later than ARGV[2] (another process saw the user come
# back); 1 when the user is gone (removed now, or expired and cleaned up already).
REMOVE_IF_NOT_BACK = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 1 end
if tonumber(score) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


T = TypeVar("T")


def _by_shard(items: Iterable[T], room_of: Callable[[T], int]) -> dict[int, list[T]]:
    """Items grouped by the Redis shard of their room."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(id(client_for(_shard_key(room_of(item)))), []).append(item)
    return groups


def _same(room: int) -> int:
    return room


# Rooms refreshed per pipeline by the heartbeat: 1,500 commands, about a millisecond of Redis,
# so other clients' commands never wait long behind one, and a process of 10,000 users in ~7,000
# rooms refreshes them in 14 round trips instead of 7,000.
BEAT_ROOMS_PER_PIPELINE = 500

# Batches of presence questions in flight at once (one: the rest wait and go out together, as
# `chat.reads_pg.LANES`), and questions per batch (a 500-room resume fits in one).
BATCH_LANES = 1
BATCH_MAX = 500


class PresenceBatches(NamedTuple):
    loop: asyncio.AbstractEventLoop
    online: Coalescer[int, Online]
    adds: Coalescer[tuple[int, str], bool]


class Announcements:
    """Presence changes waiting to be published: per room, each user's latest status.

    Gathered for PARLEY_PRESENCE_BATCH_MS, then one frame per room and status. A user who went
    and came back within the window is announced once, with the status that holds now (the
    frames of one window carry each user once, so their order does not matter)."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[int, tuple[str, str]]] = {}  # room -> user -> (name, status)
        self.flusher: asyncio.Task[None] | None = None

    def add(self, room: int, user: int, username: str, status: str) -> None:
        self.pending.setdefault(room, {})[user] = (username, status)
        loop = asyncio.get_running_loop()
        # (A flusher of another loop, gone with it, would never run again: tests run one loop each.)
        if self.flusher is None or self.flusher.done() or self.flusher.get_loop() is not loop:
            self.flusher = loop.create_task(self._flush(), name="presence-announcer")

    async def _flush(self) -> None:
        """Publish a window's changes, and the next window's while more come; ends when none wait."""
        while self.pending:
            await asyncio.sleep(CONFIG.presence_batch_seconds)
            pending, self.pending = self.pending, {}
            try:
                await self._publish(pending)
            except (RedisError, OSError) as exc:
                # Best effort, as the rest of presence: `joined` frames and the TTL stay right.
                log.warning("presence: %d rooms' changes not announced: %s", len(pending), type(exc).__name__)
            except Exception:
                log.exception("presence: %d rooms' changes not announced", len(pending))

    @staticmethod
    async def _publish(pending: dict[int, dict[int, tuple[str, str]]]) -> None:
        from chat import fanout  # fanout does not import presence; this keeps it that way

        frames: list[tuple[int, None, str]] = []
        for room, users in pending.items():
            for status in ("offline", "online"):
                listed = [{"id": user, "username": name}
                          for user, (name, said) in sorted(users.items()) if said == status]
                if listed:
                    frames.append((room, None, dumps({"type": "presence", "room": room,
                                                      "status": status, "users": listed})))
        await fanout.publish_many(frames)


class PresenceBook:
    def __init__(self) -> None:
        self.batches: PresenceBatches | None = None
        self.news = Announcements()
        self.local: Counter[tuple[int, int]] = Counter()
        # Departures by due time (a heap: the grace period is a setting, and tests change it).
        self.leaving: list[Leaving] = []
        self.sweeper: asyncio.Task[None] | None = None
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

    async def mark_online_many(self, rooms: list[int], user: int, username: str) -> list[int]:
        """Add the user to the rooms' online sets; the rooms where that is news (the set did
        not hold the user: announce those). Batched with other sockets' arrivals."""
        member = _member(user, username)
        added = await self._batches().adds.get_many((room, member) for room in rooms)
        return [room for (room, _), new in added.items() if new]

    async def _add(self, keys: list[tuple[int, str]]) -> dict[tuple[int, str], bool]:
        expires = time.time() + self._ttl()
        added: dict[tuple[int, str], bool] = {}
        for shard_keys in _by_shard(keys, lambda key: key[0]).values():
            pipe = client_for(_shard_key(shard_keys[0][0])).pipeline(transaction=False)
            for room, member in shard_keys:
                pipe.zadd(presence_key(room), {member: expires})
            for key, count in zip(shard_keys, await pipe.execute(), strict=True):
                added[key] = bool(count)
        return added

    def _batches(self) -> PresenceBatches:
        """This loop's batched reads and writes (`chat.coalesce`): in a resume storm the sockets
        of a room ask the same question, and each pipeline costs the process ~300 µs of CPU."""
        loop = asyncio.get_running_loop()
        if self.batches is None or self.batches.loop is not loop:
            self.batches = PresenceBatches(loop, Coalescer(self._online, BATCH_LANES, BATCH_MAX),
                                           Coalescer(self._add, BATCH_LANES, BATCH_MAX))
        return self.batches

    def leave_later(self, room: int, user: int, username: str, announce: bool) -> None:
        """The user's last local connection left the room: settle it after the grace period."""
        due = time.monotonic() + CONFIG.presence_grace_seconds
        # Our own writes for this entry are at most now + TTL: a later expiry in the set means
        # that some process saw the user arrive after this.
        bound = time.time() + self._ttl()
        heapq.heappush(self.leaving, Leaving(due, bound, room, user, username, announce))
        loop = asyncio.get_running_loop()
        # (A sweeper of another loop, gone with it, would never run again: tests run one loop each.)
        if self.sweeper is None or self.sweeper.done() or self.sweeper.get_loop() is not loop:
            self.sweeper = loop.create_task(self._sweep(), name="presence-sweeper")

    async def _sweep(self) -> None:
        """Settle departures as they fall due, a batch per shard per pass; ends when none wait."""
        while self.leaving:
            wait = self.leaving[0].due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            due: list[Leaving] = []
            while self.leaving and self.leaving[0].due <= now:
                due.append(heapq.heappop(self.leaving))
            try:
                await self._settle(due)
            except (RedisError, OSError) as exc:
                # The entries expire with their TTL anyway; only the `offline` frames are lost.
                log.warning("presence: %d departures not settled: %s", len(due), type(exc).__name__)
            except Exception:
                # Never end with departures left waiting and nobody to settle them.
                log.exception("presence: %d departures not settled", len(due))

    async def _settle(self, due: list[Leaving]) -> None:
        gone = [leaving for leaving in due if self.local.get((leaving.room, leaving.user), 0) == 0]
        for shard_items in _by_shard(gone, lambda leaving: leaving.room).values():
            client = client_for(_shard_key(shard_items[0].room))
            pipe = client.pipeline(transaction=False)
            for leaving in shard_items:
                pipe.eval(REMOVE_IF_NOT_BACK, 1, presence_key(leaving.room), _member(leaving.user, leaving.username),
                          leaving.bound)
            for leaving, removed in zip(shard_items, await pipe.execute(), strict=True):
                if removed and leaving.announce:
                    self.news.add(leaving.room, leaving.user, leaving.username, "offline")

    def announce_online(self, rooms: Iterable[int], user: int, username: str) -> None:
        """Tell the rooms' members the user came online (with the window's other changes)."""
        for room in rooms:
            self.news.add(room, user, username, "online")

    async def online(self, room: int) -> Online:
        return (await self.online_many([room]))[room]

    async def online_many(self, rooms: list[int]) -> dict[int, Online]:
        """`Online` of each room, read together with other sockets' questions (one pipelined
        round trip per shard per batch). At most PARLEY_PRESENCE_MAX users are read per room,
        whatever its size."""
        found = await self._batches().online.get_many(rooms)
        return {room: online or Online([], 0) for room, online in found.items()}

    async def _online(self, rooms: list[int]) -> dict[int, Online]:
        now = time.time()
        most = CONFIG.presence_max
        result: dict[int, Online] = {}
        for shard_rooms in _by_shard(rooms, _same).values():
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
        """Refresh every local entry (called from the process heartbeat): one pipeline per shard
        for up to BEAT_ROOMS_PER_PIPELINE rooms. A round trip per room cost a process with 5,000
        users in 3.7 rooms each ~1,300 pipelines a second, a quarter of a core (the Locust runs'
        CPU per socket, docs/loadtest.md)."""
        now = time.time()
        expires = now + self._ttl()
        by_room: dict[int, dict[str, float]] = {}
        for room, user in list(self.local):
            by_room.setdefault(room, {})[_member(user, self.names.get(user, ""))] = expires
        for shard_rooms in _by_shard(by_room, _same).values():
            client = client_for(_shard_key(shard_rooms[0]))
            for start in range(0, len(shard_rooms), BEAT_ROOMS_PER_PIPELINE):
                pipe = client.pipeline(transaction=False)
                for room in shard_rooms[start:start + BEAT_ROOMS_PER_PIPELINE]:
                    pipe.zadd(presence_key(room), by_room[room])
                    pipe.zremrangebyscore(presence_key(room), "-inf", now)
                    pipe.expire(presence_key(room), int(self._ttl() * 4))
                await pipe.execute()


PRESENCE = PresenceBook()
