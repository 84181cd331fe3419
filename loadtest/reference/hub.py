"""The O(1) pub/sub hub: a Channels consumer whose fan-out costs one Redis message per process.

The second reference of `make bench`. Same wire protocol as the tutorial chat
(`ws://HOST/ws/hub/<room>/`, `{"message": ...}` both ways), but the fan-out is what a lean
Channels app can do at best:

- each process subscribes ONCE per room with local members to the Redis topic `hub:<room>`, on
  one pub/sub connection per process (redis.asyncio), opened lazily by the first member;
- a client's message is encoded once, by its sender's consumer, and PUBLISHed once;
- the process hands the very text it received from Redis to each local member with the ASGI
  send (no json.dumps per member, no channel-layer channel per consumer, no dispatch through the
  consumer's handlers);
- the topic is unsubscribed when the room's last local member leaves.

Process tuning as Parley's: the same garbage-collector schedule (`chat.collector`).

No persistence, no acks, no ordering repair, no auth: what Parley does beyond fan-out is its
overhead against this. A lost subscription loses messages (redis-py re-subscribes on reconnect,
and the loss is logged as an error so that the benchmark reports the hub as failing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import redis.asyncio as redis
from channels.generic.websocket import AsyncWebsocketConsumer

# The garbage-collector schedule of Parley's protocol processes (`chat.collector`: survivors
# frozen out of the collector's passes): the reference gets the same process tuning as Parley,
# so that the ratio compares fan-out designs, not GC settings. Only that module is used.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "app"))
from chat import collector

log = logging.getLogger(__name__)

TOPIC_PREFIX = "hub:"
# A member is accepted only once Redis confirmed the room's subscription (PUBLISHes sent after
# that reach this process); a Redis that does not confirm within this is down.
SUBSCRIBE_TIMEOUT = 5.0
# Concurrent PUBLISHes (one per sender's message): a few connections keep Redis busy. A blocking
# pool waits for a free one; redis-py 8's default pool raises MaxConnectionsError past 100.
PUBLISH_CONNECTIONS = 16
# Pause before reading again after a failed read, so that a Redis that is down is not hammered.
READ_RETRY_SECONDS = 0.5


class Hub:
    """This process's rooms: room -> local members, one subscription per room that has any."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rooms: dict[str, set[HubConsumer]] = {}
        # room -> resolved once Redis confirmed its SUBSCRIBE; present while subscribed.
        self.subscribed: dict[str, asyncio.Future[None]] = {}
        # Subscription changes go out one at a time, in the order membership changed.
        self.lock = asyncio.Lock()
        self.publisher: redis.Redis | None = None
        self.pubsub: redis.client.PubSub | None = None
        self.reader: asyncio.Task[None] | None = None

    async def join(self, room: str, member: HubConsumer) -> None:
        self.rooms.setdefault(room, set()).add(member)
        await self._sync(room)
        await asyncio.wait_for(asyncio.shield(self.subscribed[room]), SUBSCRIBE_TIMEOUT)

    async def leave(self, room: str, member: HubConsumer) -> None:
        members = self.rooms.get(room)
        if members is None:
            return
        members.discard(member)
        if not members:
            del self.rooms[room]
            await self._sync(room)

    async def publish(self, room: str, text: str) -> None:
        assert self.publisher is not None  # a member of the room has joined, so it exists
        await self.publisher.publish(TOPIC_PREFIX + room, text)

    async def _sync(self, room: str) -> None:
        """Subscribe or unsubscribe the room's topic so that it matches the membership now."""
        async with self.lock:
            wanted = room in self.rooms
            if wanted and room not in self.subscribed:
                self.subscribed[room] = asyncio.get_running_loop().create_future()
                pubsub = self._connect()
                try:
                    await pubsub.subscribe(TOPIC_PREFIX + room)
                except BaseException:
                    del self.subscribed[room]  # not subscribed: the next join tries again
                    raise
                # The reader starts after the first SUBSCRIBE: before it, redis-py's PubSub has no
                # connection to read (get_message raises, listen returns at once).
                if self.reader is None:
                    self.reader = asyncio.get_running_loop().create_task(self._read(pubsub))
            elif not wanted and room in self.subscribed:
                del self.subscribed[room]
                await self._connect().unsubscribe(TOPIC_PREFIX + room)

    def _connect(self) -> redis.client.PubSub:
        """The process's Redis clients, made by its first member: a publisher pool and the PubSub."""
        if self.pubsub is None:
            self.publisher = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
                self.url, max_connections=PUBLISH_CONNECTIONS))
            # decode_responses: a payload arrives as the str the ASGI send takes, decoded once.
            self.pubsub = redis.Redis.from_url(self.url, decode_responses=True).pubsub()
        return self.pubsub

    async def _read(self, pubsub: redis.client.PubSub) -> None:
        """The process's one reader. It never ends: after a failed read (logged) redis-py reconnects
        and re-subscribes on the next one; what was published meanwhile is lost."""
        while True:
            try:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    await self._handle(message)
            except Exception:
                log.exception("hub: reading pub/sub failed; messages published meanwhile are lost")
                await asyncio.sleep(READ_RETRY_SECONDS)

    async def _handle(self, message: dict) -> None:
        room = message["channel"][len(TOPIC_PREFIX):]
        if message["type"] == "message":
            await self._deliver(room, message["data"])
        elif message["type"] == "subscribe":
            confirmed = self.subscribed.get(room)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)

    async def _deliver(self, room: str, text: str) -> None:
        event = {"type": "websocket.send", "text": text}
        # A copy: members may leave while a send waits for a slow socket.
        for member in tuple(self.rooms.get(room, ())):
            try:
                await member.base_send(event)
            except OSError:
                pass  # its socket closed; its disconnect() takes it out of the room


HUB = Hub(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


class HubConsumer(AsyncWebsocketConsumer):
    # No channel layer: the hub is the fan-out, a per-consumer channel would undo it.
    channel_layer_alias = None

    async def connect(self) -> None:
        collector.ensure_started()
        self.room_name = self.scope["url_route"]["kwargs"]["room_name"]
        await HUB.join(self.room_name, self)
        await self.accept()

    async def disconnect(self, close_code: int) -> None:
        await HUB.leave(self.room_name, self)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        message = json.loads(text_data or "")["message"]
        await HUB.publish(self.room_name, json.dumps({"message": message}))
