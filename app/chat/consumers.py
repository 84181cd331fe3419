"""The WebSocket consumer: one socket per client, multiplexing all of the user's rooms.

Hot path: a stored message arrives once per process from the room bus (`chat.fanout`) as an
already-encoded frame; `deliver` checks its seq against this connection's cursor for the room
and queues the same string object for writing. Sends leave through the `chat.persist` worker
channel; the worker acks through the bus's per-process reply topic after the message is stored.
A connection has no channel-layer channel of its own and a writer task only while it has frames
to write: an idle socket costs little more than the server's own protocol objects.

Every room cursor guarantees in-order, gap-free delivery: a message whose seq is not the next
one (lost pub/sub message, out-of-order publish by two workers, Redis reconnect) triggers a
catch-up from the database, during which live frames for that room are held back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull, StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from redis.exceptions import RedisError

from chat import fanout, metrics, services
from chat.presence import PRESENCE
from chat.process import STATE, ensure_heartbeat, process_id
from chat.protocol import CloseCode, ErrorCode, ProtocolError, dumps, error_frame, parse
from chat.ratelimit import TokenBucket
from chat.workers import PERSIST_CHANNEL
from parley.config import CONFIG

log = logging.getLogger(__name__)

_connection_keys = itertools.count(1)


@dataclass(slots=True)
class Cursor:
    """This connection's position in one room."""

    last_seq: int = 0
    filling: bool = True  # live frames wait in `pending` until the database catch-up is done
    pending: list[tuple[int, str]] = field(default_factory=list)


class ChatConsumer(AsyncWebsocketConsumer):
    rooms: dict[int, Cursor]
    # No channel-layer channel per socket (see the module docstring); the layer is used only to
    # send to the worker channel.
    channel_layer_alias = None
    channel_layer = None
    # Background catch-ups of this connection; created with the first one.
    tasks: set[asyncio.Task[Any]] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Channels' loop, for a consumer with one event source (the socket, no layer channel).

        Channels runs every consumer through `await_many_dispatch`, which costs each socket a
        second task and an `asyncio.wait` set-up per event, and a thread hop per event to close
        stale database connections (`database_sync_to_async` already does that around every
        query here).
        """
        self.scope = scope
        self.base_send = send
        try:
            while True:
                message = await receive()
                handler = getattr(self, get_handler_name(message), None)
                if handler is None:
                    raise ValueError(f"no handler for message type {message['type']}")
                await handler(message)
        except StopConsumer:
            pass

    # --- connection lifecycle ------------------------------------------------------------------

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.accept()
            await self.send(text_data=dumps(error_frame(ErrorCode.FORBIDDEN, "authentication required")))
            await self.close(code=CloseCode.UNAUTHENTICATED)
            return
        if STATE.draining:
            await self.accept()
            # Jittered like the drain itself, so refused clients do not come straight back.
            delay = random.randint(CONFIG.reconnect_jitter_ms // 2, CONFIG.reconnect_jitter_ms)
            await self.send(text_data=dumps({"type": "reconnect", "delay_ms": delay, "reason": "draining"}))
            await self.close(code=CloseCode.SERVICE_RESTART)
            return
        self.user_id: int = user.pk
        self.username: str = user.get_username()
        self.rooms = {}
        self.bucket = TokenBucket(CONFIG.rate_per_second, CONFIG.rate_burst)
        # Created when there is something to write, dropped when written: idle sockets hold none.
        self.outbox: deque[str | int] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.closing = False
        self.key = next(_connection_keys)
        self.bus = fanout.get_bus()
        self.bus.register(self.key, self)
        ensure_heartbeat("protocol", PRESENCE)
        await self.accept()
        STATE.connections.add(self)
        metrics.CONNECTIONS.inc()
        self.push(
            {
                "type": "hello",
                "user": {"id": self.user_id, "username": self.username},
                "limits": {
                    "max_body_bytes": CONFIG.max_body_bytes,
                    "rate_per_second": CONFIG.rate_per_second,
                    "rate_burst": CONFIG.rate_burst,
                    "resume_max": CONFIG.resume_max,
                },
            }
        )

    async def disconnect(self, code: int) -> None:
        if not hasattr(self, "rooms"):
            return
        STATE.connections.discard(self)
        metrics.CONNECTIONS.dec()
        self.bus.unregister(self.key)
        if self.writer is not None:
            self.writer.cancel()
        for task in list(self.tasks or ()):
            task.cancel()
        for room in list(self.rooms):
            try:
                await self._detach(room)
            except (RedisError, OSError) as exc:
                log.warning("could not detach from room %s on disconnect: %s", room, exc)

    # --- writing: one bounded queue per connection, a writer task only while it is not empty --

    def push(self, frame: dict[str, Any]) -> None:
        self.push_text(dumps(frame))

    def push_text(self, text: str) -> None:
        if self.closing:
            return
        if self.outbox is None:
            self.outbox = deque()
        elif len(self.outbox) >= CONFIG.send_buffer_frames:
            # It will `resume` on reconnect; holding more for it would slow everyone else.
            metrics.SLOW_CLOSES.inc()
            self._close_soon(CloseCode.TOO_SLOW, flush=False)
            return
        self.outbox.append(text)
        self._wake_writer()

    def push_error(self, code: ErrorCode, message: str, ref: str | None = None, **extra: Any) -> None:
        metrics.ERRORS_OUT.labels(code=str(code)).inc()
        self.push(error_frame(code, message, ref, **extra))

    def backlog(self) -> int:
        return len(self.outbox) if self.outbox else 0

    def _close_soon(self, code: int, flush: bool) -> None:
        if self.closing:
            return
        self.closing = True
        if self.outbox is None or not flush:
            self.outbox = deque()
            if self.writer is not None:
                # It may be waiting on a client that stopped reading: the close must not queue
                # behind it. The frame it was sending is already written (or never will be).
                self.writer.cancel()
                self.writer = None
        self.outbox.append(code)
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        me = asyncio.current_task()
        try:
            while self.outbox:
                item = self.outbox.popleft()
                if isinstance(item, int):
                    self.outbox = None
                    await self.close(code=item)
                    return
                try:
                    # base_send directly: Channels' send() wraps it in two more coroutines per frame.
                    await self.base_send({"type": "websocket.send", "text": item})
                except Exception as exc:
                    # The socket closed under the writer (the disconnect event is on its way):
                    # the rest cannot be delivered here, the client resumes from its last seq.
                    log.debug("connection %s closed while writing: %r", self.key, exc)
                    self.closing = True
                    self.outbox = None
                    return
                metrics.DELIVERIES.inc()
            self.outbox = None
        finally:
            if self.writer is me:
                self.writer = None

    def start_drain(self, delay_ms: int) -> None:
        self.push({"type": "reconnect", "delay_ms": delay_ms, "reason": "draining"})
        self._close_soon(CloseCode.SERVICE_RESTART, flush=True)

    # --- delivery from the room bus -------------------------------------------------------------

    def deliver(self, room: int, seq: int | None, text: str) -> None:
        cursor = self.rooms.get(room)
        if cursor is None:
            return
        if seq is None:
            self.push_text(text)
            return
        if cursor.filling:
            cursor.pending.append((seq, text))
            return
        if seq <= cursor.last_seq:
            return  # already delivered (by a catch-up or a duplicate publish)
        if seq > cursor.last_seq + 1:
            cursor.pending.append((seq, text))
            self._start_fill(room, announce=False)
            return
        cursor.last_seq = seq
        self.push_text(text)

    def resync(self, room: int) -> None:
        cursor = self.rooms.get(room)
        if cursor is not None and not cursor.filling:
            self._start_fill(room, announce=False)

    def _start_fill(self, room: int, announce: bool) -> None:
        cursor = self.rooms[room]
        cursor.filling = True
        task = asyncio.get_running_loop().create_task(self._fill(room, cursor, announce))
        if self.tasks is None:
            self.tasks = set()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _fill(self, room: int, cursor: Cursor, announce: bool) -> None:
        """Deliver what the database has after the cursor, then the held-back live frames."""
        metrics.CATCHUPS.inc()
        limit = CONFIG.resume_max
        try:
            frames = await database_sync_to_async(services.messages_after)(room, cursor.last_seq, limit + 1)
            latest = None
            if len(frames) > limit:
                latest = (await database_sync_to_async(services.last_seqs)([room])).get(room, 0)
        except Exception:
            log.exception("catch-up of room %s failed", room)
            if self.rooms.get(room) is cursor:
                self.push_error(ErrorCode.UNAVAILABLE, "could not load missed messages; send resume", room=room)
                cursor.filling = False
            return
        if self.rooms.get(room) is not cursor:
            return
        if latest is not None:
            # Too far behind to replay: the client reloads history instead.
            cursor.last_seq = latest
            cursor.pending = [(s, t) for s, t in cursor.pending if s > latest]
            self.push({"type": "reload", "room": room, "last_seq": latest})
        else:
            for frame in frames:
                cursor.last_seq = frame["seq"]
                self.push_text(dumps(frame))
            if announce:
                self.push({"type": "resumed", "room": room, "last_seq": cursor.last_seq})
        self._release(room, cursor)

    def _release(self, room: int, cursor: Cursor) -> None:
        cursor.filling = False
        pending, cursor.pending = sorted(cursor.pending), []
        for seq, text in pending:
            if self.rooms.get(room) is cursor:
                self.deliver(room, seq, text)

    # --- attaching to rooms ---------------------------------------------------------------------

    async def _attach(self, room: int, from_seq: int | None) -> dict[str, Any]:
        """Subscribe first, then read the room: nothing committed in between can be missed."""
        if room in self.rooms:
            info = await database_sync_to_async(services.join_room)(self.user_id, room)
            cursor = self.rooms[room]
            if from_seq is not None and not cursor.filling:
                cursor.last_seq = min(from_seq, cursor.last_seq)
                self._start_fill(room, announce=True)
            return info
        cursor = self.rooms[room] = Cursor()
        try:
            await self.bus.join(room, self)
            info = await database_sync_to_async(services.join_room)(self.user_id, room)
        except BaseException as exc:
            self.rooms.pop(room, None)
            await self.bus.leave(room, self)
            if isinstance(exc, fanout.BusUnavailable):
                raise ProtocolError(ErrorCode.UNAVAILABLE, "the room's message bus is unreachable") from exc
            raise
        if from_seq is None:
            # Live frames wait until the caller has sent `joined`, then `_release` lets them out.
            cursor.last_seq = info["last_seq"]
        else:
            # The caller starts the catch-up once it has sent `joined`.
            cursor.last_seq = min(from_seq, info["last_seq"])
        return info

    async def _arrive(self, room: int) -> None:
        if PRESENCE.arrive(room, self.user_id, self.username):
            await self._announce_presence(room, "online")

    async def _detach(self, room: int) -> None:
        if self.rooms.pop(room, None) is None:
            return
        await self.bus.leave(room, self)
        if PRESENCE.depart(room, self.user_id):
            await PRESENCE.mark_offline(room, self.user_id, self.username)
            await self._announce_presence(room, "offline")

    async def _announce_presence(self, room: int, status: str) -> None:
        if status == "online":
            await PRESENCE.mark_online(room, self.user_id, self.username)
        frame = {"type": "presence", "room": room, "user": self._me(), "status": status}
        await fanout.publish(room, None, dumps(frame))

    def _me(self) -> dict[str, Any]:
        return {"id": self.user_id, "username": self.username}

    def _joined(self, room: int) -> Cursor:
        cursor = self.rooms.get(room)
        if cursor is None:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join room {room} first")
        return cursor

    # --- client frames --------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        allowed = self.bucket.take()
        ref: str | None = None
        try:
            if text_data is None:
                raise ProtocolError(ErrorCode.BINARY_UNSUPPORTED, "binary frames are not supported; send JSON text")
            frame = parse(text_data)
            ref = frame.get("ref") or frame.get("client_msg_id")
            metrics.FRAMES_IN.labels(type=frame["type"]).inc()
            if not allowed:
                raise ProtocolError(ErrorCode.RATE_LIMITED, "too many frames; slow down and retry", ref)
            await getattr(self, f"on_{frame['type']}")(frame, ref)
        except ProtocolError as exc:
            self.push_error(exc.code, exc.message, exc.ref or ref)
        except (RedisError, OSError) as exc:
            log.warning("redis error handling a frame: %s", exc)
            self.push_error(ErrorCode.UNAVAILABLE, "a backend is unreachable; retry shortly", ref)
        except Exception:
            log.exception("frame handling failed")
            self.push_error(ErrorCode.INTERNAL, "internal error; the frame was not processed", ref)

    async def on_ping(self, frame: dict[str, Any], ref: str | None) -> None:
        self.push({"type": "pong", "ref": ref, "server_time": time.time()})

    async def on_join(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        already = room in self.rooms
        info = await self._attach(room, None)
        await self._push_joined(room, info, ref)
        cursor = self.rooms.get(room)
        if cursor is not None and not already:
            self._release(room, cursor)
            await self._arrive(room)

    async def _push_joined(self, room: int, info: dict[str, Any], ref: str | None) -> None:
        online = await PRESENCE.online(room)
        if all(user["id"] != self.user_id for user in online):
            online.append(self._me())
        self.push({"type": "joined", "room": room, "info": info, "online": online, "ref": ref})

    async def on_leave(self, frame: dict[str, Any], ref: str | None) -> None:
        await self._detach(frame["room"])
        self.push({"type": "left", "room": frame["room"], "ref": ref})

    async def on_resume(self, frame: dict[str, Any], ref: str | None) -> None:
        for key, last_seq in frame["rooms"].items():
            room = int(key)
            already = room in self.rooms
            try:
                info = await self._attach(room, last_seq)
            except ProtocolError as exc:
                self.push_error(exc.code, exc.message, ref, room=room)
                continue
            if not already:
                # joined, then the missed messages, then resumed: a client can rebuild the room.
                await self._push_joined(room, info, ref)
                self._start_fill(room, announce=True)
                await self._arrive(room)

    async def on_send(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        self._joined(room)
        try:
            await get_channel_layer().send(
                PERSIST_CHANNEL,
                {
                    "type": "persist.message",
                    "room": room,
                    "sender": self.user_id,
                    "body": frame["body"],
                    "kind": "text",
                    "client_msg_id": frame["client_msg_id"],
                    "reply_to": fanout.reply_address(process_id(), self.key),
                    "queued_at": time.time(),
                },
            )
        except ChannelFull:
            raise ProtocolError(ErrorCode.BUSY, "the server is busy; retry this send later", ref) from None
        metrics.MESSAGES_IN.inc()

    async def on_typing(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        self._joined(room)
        await fanout.publish(room, None, dumps({"type": "typing", "room": room, "user": self._me()}))

    async def on_read(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        self._joined(room)
        seq = await database_sync_to_async(services.mark_read)(self.user_id, room, frame["seq"])
        await fanout.publish(room, None, dumps({"type": "read", "room": room, "user": self._me(), "seq": seq}))

    async def on_history(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        limit = min(frame.get("limit", 50), CONFIG.history_max)
        messages, has_more = await database_sync_to_async(services.history)(
            self.user_id, room, frame.get("before_seq"), limit
        )
        self.push({"type": "history", "room": room, "messages": messages, "has_more": has_more, "ref": ref})
