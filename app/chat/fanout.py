"""Room fan-out: one Redis subscription per room per process, frames encoded once.

A worker publishes each stored message once, to the room's topic on the room's shard. Every
protocol process that has members of the room holds one subscription to that topic and hands the
already-encoded frame to each local member. Redis work per message per process is O(1), and so is
decoding and encoding: members receive the very bytes the worker published.

Pub/sub is at-most-once: a message published while a subscription is down is gone. So every
(re)connect of a shard's subscription after the first calls `on_reset` for the rooms it carries;
members then catch up from the database (PostgreSQL is the truth, Redis only the transport).

Wire format of a published payload: `<seq>\n<frame JSON>`, `<seq>` empty for ephemeral frames
(typing, presence, read) that have no place in the room's sequence.

Replies to one socket (acks and errors from workers) travel the same way, on the process's own
topic `<prefix>:process:<process id>` with payload `<connection key>\n<frame JSON>`: a socket needs
no channel-layer channel of its own (no receive task, no queue), which halves its memory.

Every process also listens on the platform's control topic (`<prefix>:control`, `chat.control`):
JSON commands such as "close this user's sockets" after a revocation. Topic names live in
`chat.contract`.

Redis is a transport, not an authority: a payload that is not what Parley writes (a foreign
publisher, a bug) is logged and dropped; it never stops the reader or forces a resubscribe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Protocol

from redis.asyncio.connection import Connection, parse_url
from redis.exceptions import RedisError

from chat import contract, metrics
from chat.process import process_id, raise_if_cancelling
from chat.redis_pool import client_for, clients, drop_idle_connections, redact, shard_urls
from parley.config import CONFIG
from parley.sharding import shard_index

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0
# A flood of malformed payloads must not flood the log: one line per this many seconds.
BAD_PAYLOAD_LOG_EVERY = 10.0
# A shard silent for PARLEY_REDIS_TIMEOUT (6 s) is dead: the bus PINGs three times in that time,
# so a healthy connection is never silent that long, and a half-open one is replaced (and its
# rooms re-synced) within about that long.
DEAD_AFTER = CONFIG.redis_timeout
PING_EVERY = DEAD_AFTER / 3


class BusUnavailable(Exception):
    """The room's Redis shard cannot be reached right now."""


class Member(Protocol):
    def deliver(self, room: int, seq: int | None, text: str) -> None: ...
    def resync(self, room: int) -> None: ...
    def push_text(self, text: str) -> None: ...


async def publish_replies(replies: Iterable[tuple[str, str]]) -> None:
    """Send `(reply address, frame JSON)` pairs to their processes, one round trip per shard; a
    shard that fails is replaced by another (every process reads its topic on every shard)."""
    await _publish_replies(_reply_messages(replies))


def _reply_messages(replies: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    by_process: dict[str, list[tuple[str | int, str]]] = {}
    for address, frame_json in replies:
        pid, key = contract.split_reply_address(address)
        by_process.setdefault(pid, []).append((key, frame_json))
    return [(contract.process_topic(pid), contract.encode_reply_payload(mine)) for pid, mine in by_process.items()]


def _room_messages(items: Iterable[tuple[int, int | None, str]]) -> list[tuple[str, str]]:
    return [(contract.room_topic(room), contract.encode_room_payload(seq, frame_json))
            for room, seq, frame_json in items]


async def publish_then_reply(
    items: list[tuple[int, int | None, str]], replies: list[tuple[int | None, str, str]]
) -> int:
    """A stored batch's frames to its rooms, then its replies `(room or None, address, frame)` to
    the senders' processes. Returns how many replies were withheld.

    A message's ack goes only once its frame reached its room's shard: a sender who sees its ack
    can count on the room having been sent the message. If that shard fails, the ack is withheld
    and the sender retries (same client_msg_id): the retry is stored as a duplicate and published
    again, so a message the room's subscribers never got cannot be acked into silence. Shards are
    independent: one that is down or slow costs only its own rooms (their frames and acks), not
    the acks of rooms on healthy shards in the same batch.

    On one shard, frames then acks in one pipeline (Redis runs a connection's commands in order),
    not two round trips: the second was ~40 % of the worker's Redis time (py-spy)."""
    urls = shard_urls()
    if len(urls) == 1:
        try:
            await _publish_pipeline(0, _room_messages(items) + _reply_messages((a, f) for _, a, f in replies))
        except (RedisError, OSError):
            log.warning("publishing a batch failed; %d replies withheld, senders will retry", len(replies))
            return len(replies)
        return 0
    rooms_by_shard: dict[int, list[tuple[int, int | None, str]]] = {}
    for item in items:
        rooms_by_shard.setdefault(shard_index(urls, contract.room_topic(item[0])), []).append(item)
    replies_by_shard: dict[int | None, list[tuple[str, str]]] = {}
    for room, address, frame_json in replies:
        shard = None if room is None else shard_index(urls, contract.room_topic(room))
        replies_by_shard.setdefault(shard if shard in rooms_by_shard else None, []).append((address, frame_json))

    async def shard_then_replies(shard: int, its_items: list[tuple[int, int | None, str]]) -> int:
        its_replies = replies_by_shard.get(shard, [])
        try:
            await _publish_pipeline(shard, _room_messages(its_items))
        except (RedisError, OSError) as exc:
            log.warning("publishing to shard %d failed (%s); %d replies withheld, senders will retry",
                        shard, type(exc).__name__, len(its_replies))
            return len(its_replies)
        await _publish_replies(_reply_messages(its_replies))
        return 0

    withheld = await asyncio.gather(
        *(shard_then_replies(shard, its_items) for shard, its_items in rooms_by_shard.items()),
        _publish_replies(_reply_messages(replies_by_shard.get(None, []))),
    )
    return sum(n or 0 for n in withheld)


async def publish(room: int, seq: int | None, frame_json: str) -> None:
    """Publish one frame to a room (from a worker or a protocol process)."""
    name = contract.room_topic(room)
    await client_for(name).publish(name, contract.encode_room_payload(seq, frame_json))


async def publish_many(items: Iterable[tuple[int, int | None, str]]) -> None:
    """Publish several frames with one round trip per shard, in the order given."""
    await _publish_by_shard(_room_messages(items))


def _by_shard(messages: list[tuple[str, str]]) -> dict[int, list[tuple[str, str]]]:
    """`(topic, payload)` pairs grouped by the shard of their topic, in order within each."""
    urls = shard_urls()
    by_shard: dict[int, list[tuple[str, str]]] = {}
    for name, payload in messages:
        by_shard.setdefault(shard_index(urls, name), []).append((name, payload))
    return by_shard


async def _publish_by_shard(messages: list[tuple[str, str]]) -> None:
    """PUBLISH `(topic, payload)` pairs, pipelined per shard; order is kept within a shard."""
    for shard, batch in _by_shard(messages).items():
        await _publish_pipeline(shard, batch)


async def _publish_pipeline(shard: int, messages: list[tuple[str, str]]) -> None:
    if not messages:
        return
    client = clients()[shard]
    pipe = client.pipeline(transaction=False)
    for name, payload in messages:
        pipe.publish(name, payload)
    try:
        await pipe.execute()
    except (RedisError, OSError):
        await drop_idle_connections(client)
        raise


async def _publish_replies(messages: list[tuple[str, str]]) -> None:
    """Replies to process topics: on their own shard, or on the next that answers (a process reads
    its topic on every shard). A reply no shard took is lost; its sender retries after a timeout."""
    if not messages:
        return
    urls = shard_urls()

    async def to_any_shard(first: int, batch: list[tuple[str, str]]) -> None:
        for attempt in range(len(urls)):
            shard = (first + attempt) % len(urls)
            try:
                await _publish_pipeline(shard, batch)
                return
            except (RedisError, OSError) as exc:
                log.warning("replies to shard %d failed (%s)", shard, type(exc).__name__)
        metrics.LOST_REPLIES.inc(len(batch))

    await asyncio.gather(*(to_any_shard(shard, batch) for shard, batch in _by_shard(messages).items()))


class ShardSubscriber:
    """One pub/sub connection to one shard, kept alive and re-subscribed by a supervisor task."""

    def __init__(self, url: str, bus: RoomBus) -> None:
        self.url = url
        self.name = redact(url)  # for logs and errors: never a password
        self.bus = bus
        self.topics: set[str] = set()
        self.connection: Connection | None = None
        self.connected = asyncio.Event()
        self.waiting: dict[str, list[asyncio.Future[None]]] = {}
        self.last_seen = time.monotonic()
        self.connects = 0
        self.resync_after: set[str] = set()  # subscriptions to confirm before rooms re-sync
        self.task = asyncio.get_running_loop().create_task(self._supervise(), name=f"bus:{url}")

    async def subscribe(self, name: str) -> None:
        self.topics.add(name)
        try:
            await asyncio.wait_for(self.connected.wait(), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            self.topics.discard(name)
            raise BusUnavailable(f"Redis shard {self.name} unreachable") from None
        confirmed = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(name, []).append(confirmed)
        try:
            assert self.connection is not None
            await self.connection.send_command("SUBSCRIBE", name)
            # Only the server's confirmation means later PUBLISHes will reach us.
            await asyncio.wait_for(confirmed, SUBSCRIBE_TIMEOUT)
        except (RedisError, OSError, TimeoutError, AssertionError) as exc:
            # Not subscribed: a reconnect must not re-subscribe it for nobody.
            self.topics.discard(name)
            raise BusUnavailable(f"could not subscribe on {self.name}: {type(exc).__name__}") from None
        finally:
            waiters = self.waiting.get(name, [])
            if confirmed in waiters:
                waiters.remove(confirmed)

    async def unsubscribe(self, name: str) -> None:
        self.topics.discard(name)
        if self.connection is not None and self.connected.is_set():
            try:
                await self.connection.send_command("UNSUBSCRIBE", name)
            except (RedisError, OSError):
                pass  # the reconnect will not re-subscribe it: it is gone from self.topics

    async def _supervise(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._run_connection()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("room bus lost shard %s: %s", self.name, type(exc).__name__)
            except Exception:
                log.exception("room bus reader for %s crashed; restarting", self.name)
            raise_if_cancelling()
            self.connected.clear()
            if self.connection is not None:
                await self.connection.disconnect()
                self.connection = None
            metrics.BUS_RECONNECTS.inc()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _run_connection(self) -> None:
        options = parse_url(self.url)
        options.pop("connection_class", None)
        # RESP2: subscription replies come back from read_response (RESP3 routes them to push handlers).
        options["protocol"] = 2
        connection = Connection(**options, socket_keepalive=True, socket_connect_timeout=5)
        await connection.connect()
        self.connection = connection
        # redis-py can swallow a cancellation that lands while it connects; without this check
        # the reader would go on to subscribe and read forever, and loop shutdown would hang.
        raise_if_cancelling()
        self.last_seen = time.monotonic()
        topics = [self.bus.control_topic, self.bus.broadcast_topic, *self.topics]
        await connection.send_command("SUBSCRIBE", *topics)
        raise_if_cancelling()
        self.connects += 1
        # Whatever was published while we were away is lost to pub/sub: the rooms catch up from
        # the database, once the server has confirmed every subscription (`_handle`). Read before
        # that, a message committed after the read and published before the SUBSCRIBE took effect
        # would be in neither, and if it was the room's last, no later seq would reveal the hole.
        self.resync_after = set(topics) if self.connects > 1 else set()
        self.connected.set()
        pinger = asyncio.get_running_loop().create_task(self._ping(connection))
        try:
            while True:
                response = await connection.read_response(timeout=math.inf, disconnect_on_error=True)
                self.last_seen = time.monotonic()
                self._handle(response)
        finally:
            pinger.cancel()

    def _handle(self, response: list) -> None:
        kind = response[0]
        if kind == b"message":
            try:
                self.bus.dispatch(response[1], response[2])
            except Exception as exc:  # a payload Parley did not write: drop it, keep reading
                self.bus.bad_payload(response[1], exc)
        elif kind == b"subscribe":
            name = response[1].decode()
            for future in self.waiting.pop(name, []):
                if not future.done():
                    future.set_result(None)
            if self.resync_after:
                self.resync_after.discard(name)
                if not self.resync_after:
                    self.bus.reset_rooms(self.topics)

    async def _ping(self, connection: Connection) -> None:
        # A half-open TCP connection looks like a quiet room; PING tells them apart.
        while True:
            await asyncio.sleep(PING_EVERY)
            if time.monotonic() - self.last_seen > DEAD_AFTER:
                log.warning("room bus shard %s silent for %.0fs; reconnecting", self.name, DEAD_AFTER)
                await connection.disconnect()
                return
            try:
                await connection.send_command("PING")
            except Exception as exc:
                # Whatever failed (a reset, a timeout, a connection redis-py already closed, whose
                # writer is None), this connection is done: close it so the reader fails and the
                # supervisor reconnects. A pinger that died instead would leave a half-open
                # connection read forever, and its error unretrieved in the log.
                log.warning("room bus shard %s: PING failed (%s); reconnecting", self.name, type(exc).__name__)
                await connection.disconnect()
                return

    async def close(self) -> None:
        self.task.cancel()
        if self.connection is not None:
            await self.connection.disconnect()


class RoomBus:
    """This process's subscriptions and the local members of each room."""

    def __init__(self, process_id: str) -> None:
        self.control_topic = contract.process_topic(process_id)
        self._control = self.control_topic.encode()
        self.broadcast_topic = contract.control_topic()
        self._broadcast = self.broadcast_topic.encode()
        # Set by the protocol process: handles the platform-wide control commands.
        self.on_control: Callable[[dict], None] | None = None
        self._bad_logged = 0.0
        self.bad_payloads = 0
        self.members: dict[int, set[Member]] = {}
        self.connections: dict[int, Member] = {}
        self.shards: list[ShardSubscriber] = []
        self._locks: dict[int, asyncio.Lock] = {}
        self._topic_rooms: dict[bytes, int] = {}

    def _shard(self, name: str) -> ShardSubscriber:
        self.start()
        return self.shards[shard_index(shard_urls(), name)]

    def start(self) -> None:
        """Connect to every shard (each carries this process's reply topic)."""
        if not self.shards:
            self.shards = [ShardSubscriber(url, self) for url in shard_urls()]

    def register(self, key: int, connection: Member) -> None:
        self.start()
        self.connections[key] = connection

    def unregister(self, key: int) -> None:
        self.connections.pop(key, None)

    async def join(self, room: int, member: Member) -> None:
        """Add a local member; the first one subscribes (and waits for Redis to confirm)."""
        lock = self._locks.setdefault(room, asyncio.Lock())
        async with lock:
            members = self.members.get(room)
            if members:
                members.add(member)
                return
            name = contract.room_topic(room)
            await self._shard(name).subscribe(name)
            self.members[room] = {member}
            metrics.SUBSCRIBED_ROOMS.set(len(self.members))

    async def leave(self, room: int, member: Member) -> None:
        lock = self._locks.setdefault(room, asyncio.Lock())
        async with lock:
            members = self.members.get(room)
            if not members:
                return
            members.discard(member)
            if members:
                return
            del self.members[room]
            self._locks.pop(room, None)
            name = contract.room_topic(room)
            self._topic_rooms.pop(name.encode(), None)
            metrics.SUBSCRIBED_ROOMS.set(len(self.members))
            await self._shard(name).unsubscribe(name)

    def bad_payload(self, channel: bytes, exc: BaseException) -> None:
        self.bad_payloads += 1
        metrics.BAD_PAYLOADS.inc()
        now = time.monotonic()
        if now - self._bad_logged >= BAD_PAYLOAD_LOG_EVERY:
            self._bad_logged = now
            log.warning("dropped malformed pub/sub payload on %r (%s; %d so far)",
                        channel[:80], type(exc).__name__, self.bad_payloads)

    def dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == self._control:
            for key, text in contract.decode_reply_payload(data):
                connection = self.connections.get(key)
                if connection is not None:
                    connection.push_text(text)
            return
        if channel == self._broadcast:
            command = json.loads(data)
            if not isinstance(command, dict):
                raise ValueError("control command is not an object")
            if self.on_control is not None:
                self.on_control(command)
            return
        room = self._topic_rooms.get(channel)
        if room is None:
            room = contract.room_of_topic(channel)
            if room is None or room not in self.members:
                return
            self._topic_rooms[channel] = room
        members = self.members.get(room)
        if not members:
            return
        # Decoded once per process; every member gets the same str object.
        seq, text = contract.decode_room_payload(data)
        metrics.FANOUT_IN.inc()
        for member in tuple(members):
            member.deliver(room, seq, text)

    def reset_rooms(self, topics: Iterable[str]) -> None:
        for name in topics:
            room = contract.room_of_topic(name)
            if room is None:
                continue
            for member in tuple(self.members.get(room, ())):
                member.resync(room)

    async def close(self) -> None:
        for shard in self.shards:
            await shard.close()
        self.shards = []


_buses: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RoomBus] = weakref.WeakKeyDictionary()


def get_bus() -> RoomBus:
    loop = asyncio.get_running_loop()
    bus = _buses.get(loop)
    if bus is None:
        bus = _buses[loop] = RoomBus(process_id())
    return bus
