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

Nothing of a room reaches a socket before its `joined`: membership is checked before the
subscription, and ephemeral frames (typing, read, presence) that arrive before `joined` are
dropped. What one socket can cost is bounded (docs/security.md): bytes and frames queued for
writing, rooms per connection, concurrent catch-ups, typing and read fan-out per room.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull, StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from redis.exceptions import RedisError

from chat import collector, contract, fanout, metrics, reads, services
from chat.control_receiver import handle_control
from chat.outbox import Outbox
from chat.presence import PRESENCE, Online
from chat.process import STATE, ensure_heartbeat, process_id
from chat.protocol import CloseCode, ErrorCode, ProtocolError, dumps, error_frame, parse
from chat.ratelimit import TokenBucket
from chat.room_cursor import Cursor, Offer
from parley.config import CONFIG

log = logging.getLogger(__name__)

_connection_keys = itertools.count(1)

# Beyond the rate limit a connection is told so at most once per this many seconds; what else it
# sends meanwhile is dropped unread (documented: re-send after an error, as after any error).
RATE_LIMITED_NOTICE_SECONDS = 1.0
# A `resume` costs one frame of the rate limit per this many rooms: 500 rooms take 20 of the
# default 40-frame burst, so one connection replays 500 rooms about once a second at most.
ROOMS_PER_FRAME_COST = 25


class ChatConsumer(AsyncWebsocketConsumer):
    rooms: dict[int, Cursor]
    # No channel-layer channel per socket (see the module docstring); the layer is used only to
    # send to the worker channel.
    channel_layer_alias = None
    channel_layer = None
    # Background catch-ups of this connection; created with the first one.
    tasks: set[asyncio.Task[Any]] | None = None
    # Set once the socket was accepted for an authenticated user with room under the caps.
    admitted = False
    closing = False
    limited_at = -1e9  # when this connection was last told `rate_limited`
    # The server's synchronous write, when it offers one (`contract.WRITE_NOW_EXTENSION`).
    write_now: Callable[[str], bool] | None = None
    token_hash: str | None = None

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
        finally:
            # Cancelled without a disconnect event (a server giving up on the application):
            # the socket must still leave the process's books, or its user's cap fills up.
            if self._forget() and self.rooms:
                with contextlib.suppress(RuntimeError):  # the loop itself is closing: nothing left
                    asyncio.get_running_loop().create_task(self._detach_all())

    # --- connection lifecycle ------------------------------------------------------------------

    async def _refuse(self, code: int, error: ErrorCode, message: str, **extra: Any) -> None:
        """Accept, say why in an error frame, close with a documented code: a client can tell
        'log in again' or 'too many sockets' from a network failure."""
        self.closing = True
        await self.accept()
        await self.send(text_data=dumps(error_frame(error, message, **extra)))
        await self.close(code=code)

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self._refuse(CloseCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, "authentication required")
            return
        if STATE.draining:
            self.closing = True
            await self.accept()
            # Jittered like the drain itself, so refused clients do not come straight back.
            delay = random.randint(CONFIG.reconnect_jitter_ms // 2, CONFIG.reconnect_jitter_ms)
            await self.send(text_data=dumps({"type": "reconnect", "delay_ms": delay, "reason": "draining"}))
            await self.close(code=CloseCode.SERVICE_RESTART)
            return
        self.user_id: int = user.pk
        self.username: str = user.get_username()
        self.token_hash = getattr(user, "token_hash", None)
        if not STATE.add(self, self.user_id):
            await self._refuse(
                CloseCode.TOO_MANY_SOCKETS, ErrorCode.RATE_LIMITED,
                f"at most {CONFIG.max_sockets_per_user} sockets per user on one server; close one",
            )
            return
        self.admitted = True
        self.write_now = (self.scope.get("extensions") or {}).get(contract.WRITE_NOW_EXTENSION)
        self.rooms = {}
        self.bucket = TokenBucket(CONFIG.rate_per_second, CONFIG.rate_burst)
        # Created when there is something to write, dropped when written: idle sockets hold none.
        self.outbox: Outbox | None = None
        self.catchup_slots: asyncio.Semaphore | None = None
        self.key = next(_connection_keys)
        self.bus = fanout.get_bus()
        if self.bus.on_control is None:
            self.bus.on_control = handle_control
        self.bus.register(self.key, self)
        ensure_heartbeat("protocol", PRESENCE)
        collector.ensure_started()
        await self.accept()
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
                    "max_rooms": CONFIG.max_rooms_per_connection,
                },
            }
        )

    def _forget(self) -> bool:
        """Leave the process's books (synchronous: also runs when the consumer is cancelled).
        True the first time, when there was something to forget."""
        if not self.admitted:
            return False
        self.admitted = False
        self.closing = True
        STATE.remove(self, self.user_id)
        metrics.CONNECTIONS.dec()
        self.bus.unregister(self.key)
        if self.outbox is not None:
            self.outbox.cancel()
        for task in list(self.tasks or ()):
            task.cancel()
        return True

    async def disconnect(self, code: int) -> None:
        if self._forget():
            await self._detach_all()

    async def _detach_all(self) -> None:
        for room in list(self.rooms):
            try:
                await self._detach(room)
            except (RedisError, OSError) as exc:
                log.warning("could not detach from room %s on disconnect: %s", room, type(exc).__name__)

    # --- writing: one bounded queue per connection, a writer task only while it is not empty --

    def push(self, frame: dict[str, Any]) -> None:
        self.push_text(dumps(frame))

    def push_text(self, text: str) -> None:
        if self.closing:
            return
        if len(text) * 3 > CONFIG.max_frame_bytes and len(text.encode()) > CONFIG.max_frame_bytes:
            # Every frame Parley builds is bounded below this (history pages are split): one
            # that is not is a bug, and the servers would refuse it anyway. Say so, keep going.
            log.error("refusing to write a %d-character frame to connection %s", len(text), self.key)
            self.push_error(ErrorCode.INTERNAL, "a reply was too large to send")
            return
        if self.outbox is None and self.write_now is not None and self.write_now(text):
            # Nothing was waiting and the server took it at once: no queue, no writer task.
            metrics.DELIVERIES.inc()
            return
        if not self._outbox().put(text):
            # It will `resume` on reconnect; holding more for it would slow everyone else.
            metrics.SLOW_CLOSES.inc()
            self._close_soon(CloseCode.TOO_SLOW, flush=False)

    def push_error(self, code: ErrorCode, message: str, ref: str | None = None, **extra: Any) -> None:
        metrics.ERRORS_OUT.labels(code=str(code)).inc()
        self.push(error_frame(code, message, ref, **extra))

    def backlog(self) -> int:
        return self.outbox.backlog() if self.outbox is not None else 0

    def close_for(self, code: int, error: str | None = None) -> None:
        """Close from outside the socket's own frames (revocation): the error frame, then close."""
        if error is not None:
            self.push_error(ErrorCode.FORBIDDEN, error)
        self._close_soon(code, flush=True)

    def _close_soon(self, code: int, flush: bool) -> None:
        if self.closing:
            return
        self.closing = True
        if flush:
            self._outbox().close_after(code)
        else:
            self._outbox().close_now(code)

    def _outbox(self) -> Outbox:
        if self.outbox is None:
            self.outbox = Outbox(self, CONFIG.send_buffer_frames, CONFIG.send_buffer_bytes)
        return self.outbox

    # --- the outbox's sink (chat.outbox.Sink) ---

    def outbox_idle(self, outbox: Outbox) -> None:
        if self.outbox is outbox:
            self.outbox = None

    async def write_frame(self, text: str) -> None:
        # base_send directly: Channels' send() wraps it in two more coroutines per frame.
        await self.base_send({"type": "websocket.send", "text": text})

    async def close_with(self, code: int) -> None:
        await self.close(code=code)

    async def write_failed(self, exc: Exception) -> None:
        """A frame could not be written. If the client is gone, its disconnect is on its way; if
        not, the socket must not stay open delivering nothing: close it with 4011 so that the
        client reconnects and resumes from its last seq."""
        gone = self.closing or "Disconnect" in type(exc).__name__ or "Closed" in type(exc).__name__
        self.closing = True
        if gone:
            log.debug("connection %s closed while writing: %r", self.key, exc)
            return
        metrics.SEND_FAILURES.inc()
        log.warning("writing to connection %s failed (%s: %s); closing with %d",
                    self.key, type(exc).__name__, str(exc)[:200], CloseCode.SEND_FAILED)
        try:
            await self.close(code=CloseCode.SEND_FAILED)
        except Exception as close_exc:
            log.debug("close after a failed write failed too: %r", close_exc)

    def start_drain(self, delay_ms: int) -> None:
        self.push({"type": "reconnect", "delay_ms": delay_ms, "reason": "draining"})
        self._close_soon(CloseCode.SERVICE_RESTART, flush=True)

    # --- delivery from the room bus -------------------------------------------------------------

    def deliver(self, room: int, seq: int | None, text: str) -> None:
        cursor = self.rooms.get(room)
        if cursor is None:
            return
        offer = cursor.offer(seq, text)
        if offer is Offer.SEND:
            self.push_text(text)
        elif offer is Offer.FILL:
            self._spawn(self._fill({room: cursor}, announce=False))

    def resync(self, room: int) -> None:
        cursor = self.rooms.get(room)
        if cursor is not None and cursor.rewind(cursor.last_seq):
            self._spawn(self._fill({room: cursor}, announce=False))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        if self.tasks is None:
            self.tasks = set()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _fill(self, cursors: dict[int, Cursor], announce: bool) -> None:
        """Deliver what the database has after each cursor, then the held-back live frames.

        One query for all the rooms given (a `resume` of 500 rooms is one catch-up, not 500),
        and at most `PARLEY_CATCHUPS_PER_CONNECTION` of them at once per connection.
        """
        limit = CONFIG.resume_max
        if self.catchup_slots is None:
            self.catchup_slots = asyncio.Semaphore(CONFIG.catchups_per_connection)
        async with self.catchup_slots:
            metrics.CATCHUPS.inc()
            after = {room: cursor.last_seq for room, cursor in cursors.items() if self.rooms.get(room) is cursor}
            try:
                found = await reads.messages_after_many(after, limit + 1)
                behind = [room for room, frames in found.items() if len(frames) > limit]
                latest = await reads.last_seqs(behind) if behind else {}
            except Exception as exc:
                if isinstance(exc, reads.DatabaseUnavailable):
                    log.warning("catch-up of %d rooms failed: %s", len(after), exc)
                else:
                    log.exception("catch-up of %d rooms failed", len(after))
                for room, cursor in cursors.items():
                    if self.rooms.get(room) is cursor:
                        self.push_error(ErrorCode.UNAVAILABLE, "could not load missed messages; send resume", room=room)
                        cursor.filling = False
                return
        for room, frames in found.items():
            cursor = cursors[room]
            if self.rooms.get(room) is not cursor:
                continue
            if room in latest:
                # Too far behind to replay: the client reloads history instead.
                cursor.skip_to(latest[room])
                self.push({"type": "reload", "room": room, "last_seq": cursor.last_seq})
            else:
                for frame in cursor.catch_up(frames):
                    self.push_text(dumps(frame))
                if announce:
                    self.push({"type": "resumed", "room": room, "last_seq": cursor.last_seq})
            self._release(room, cursor)

    def _release(self, room: int, cursor: Cursor) -> None:
        for seq, text in cursor.release():
            if self.rooms.get(room) is cursor:
                self.deliver(room, seq, text)

    # --- attaching to rooms ---------------------------------------------------------------------

    async def _attach_many(self, wanted: dict[int, int | None], ref: str | None) -> dict[int, Cursor]:
        """Join rooms not yet joined on this connection: membership first, then subscribe, then
        read each room's last seq (after the subscription: nothing committed in between is
        missed). Refusals are answered per room; returns the new cursors, `joined` sent."""
        room_ids = list(wanted)
        room_left = CONFIG.max_rooms_per_connection - len(self.rooms)
        for room in room_ids[max(room_left, 0):]:
            self.push_error(ErrorCode.TOO_MANY_ROOMS,
                            f"at most {CONFIG.max_rooms_per_connection} rooms per connection; leave one first",
                            ref, room=room)
        room_ids = room_ids[:max(room_left, 0)]
        if not room_ids:
            return {}
        answers = await reads.join_rooms(self.user_id, room_ids)
        allowed: dict[int, dict[str, Any]] = {}
        for room, answer in answers.items():
            if isinstance(answer, ProtocolError):
                self.push_error(answer.code, answer.message, ref, room=room)
            elif room not in self.rooms:  # joined meanwhile by a concurrent frame: keep that one
                allowed[room] = answer
        cursors: dict[int, Cursor] = {}
        for room in allowed:
            cursors[room] = self.rooms[room] = Cursor()
        results = await asyncio.gather(*(self.bus.join(room, self) for room in cursors), return_exceptions=True)
        for room, result in zip(list(cursors), results, strict=True):
            if isinstance(result, BaseException):
                self.rooms.pop(room, None)
                del cursors[room]
                await self.bus.leave(room, self)
                if not isinstance(result, fanout.BusUnavailable | RedisError | OSError):
                    raise result
                self.push_error(ErrorCode.UNAVAILABLE, "the room's message bus is unreachable; retry", ref, room=room)
        if not cursors:
            return {}
        latest = await reads.last_seqs(list(cursors))
        online = await PRESENCE.online_many(list(cursors))
        for room, cursor in list(cursors.items()):
            if self.rooms.get(room) is not cursor:
                del cursors[room]
                continue
            info = allowed[room]
            info["last_seq"] = latest.get(room, info["last_seq"])
            from_seq = wanted[room]
            cursor.last_seq = info["last_seq"] if from_seq is None else min(from_seq, info["last_seq"])
            cursor.quiet = online[room].crowded
            self._push_joined_now(room, info, online[room], ref)
            cursor.open = True
        return cursors

    async def _arrive_many(self, cursors: dict[int, Cursor]) -> None:
        """Presence of a `join` or `resume`: one pipelined round trip per shard, not two per room;
        announced where the room did not know the user online already, unless it is crowded."""
        first = [room for room in cursors if PRESENCE.arrive(room, self.user_id, self.username)]
        if not first:
            return
        new = [room for room in await PRESENCE.mark_online_many(first, self.user_id, self.username)
               if not cursors[room].quiet]
        # A reconnect is no news: nothing to announce.
        PRESENCE.announce_online(new, self.user_id, self.username)

    async def _detach(self, room: int) -> None:
        cursor = self.rooms.pop(room, None)
        if cursor is None:
            return
        await self.bus.leave(room, self)
        if PRESENCE.depart(room, self.user_id):
            PRESENCE.leave_later(room, self.user_id, self.username, announce=not cursor.quiet)

    def remove_from_room(self, room: int, reason: str) -> None:
        """The user lost the membership (left over HTTP, removed by the room's creator)."""
        if room not in self.rooms:
            return
        self.push({"type": "left", "room": room, "reason": reason, "ref": None})
        self._spawn(self._detach(room))

    def _me(self) -> dict[str, Any]:
        return {"id": self.user_id, "username": self.username}

    def _joined(self, room: int) -> Cursor:
        cursor = self.rooms.get(room)
        if cursor is None or not cursor.open:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join room {room} first")
        return cursor

    # --- client frames --------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if not self.admitted or self.closing:
            return  # a refused or closing socket: frames still in flight have nobody to answer
        allowed = self.bucket.take()  # every frame counts, invalid ones too
        if not allowed:
            now = time.monotonic()
            if now - self.limited_at < RATE_LIMITED_NOTICE_SECONDS:
                # Told already: a flood is dropped unparsed, so it costs neither parsing nor an
                # error frame per frame (the server's work must not grow with the attacker's).
                metrics.DROPPED_FRAMES.inc()
                return
            self.limited_at = now
        ref: str | None = None
        try:
            if not allowed:
                try:  # only for the ref to echo
                    ref = parse(text_data).get("ref") if text_data is not None else None
                except ProtocolError as exc:
                    ref = exc.ref
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    "too many frames; this one and those after it for a second were not processed", ref,
                )
            if text_data is None:
                raise ProtocolError(ErrorCode.BINARY_UNSUPPORTED, "binary frames are not supported; send JSON text")
            frame = parse(text_data)
            ref = frame.get("ref") or frame.get("client_msg_id")
            metrics.FRAMES_IN.labels(type=frame["type"]).inc()
            if frame["type"] == "resume":
                # A resume answers with a few frames per room: it costs like that many frames.
                self.bucket.charge(len(frame["rooms"]) / ROOMS_PER_FRAME_COST)
            await getattr(self, f"on_{frame['type']}")(frame, ref)
        except ProtocolError as exc:
            self.push_error(exc.code, exc.message, exc.ref or ref)
        except (RedisError, OSError) as exc:
            log.warning("redis error handling a frame: %s", type(exc).__name__)
            self.push_error(ErrorCode.UNAVAILABLE, "a backend is unreachable; retry shortly", ref)
        except reads.DatabaseUnavailable as exc:
            log.warning("database unavailable handling a frame: %s", exc)
            self.push_error(ErrorCode.UNAVAILABLE, "the database is unreachable; retry shortly", ref)
        except Exception:
            log.exception("frame handling failed")
            self.push_error(ErrorCode.INTERNAL, "internal error; the frame was not processed", ref)

    async def on_ping(self, frame: dict[str, Any], ref: str | None) -> None:
        self.push({"type": "pong", "ref": ref, "server_time": time.time()})

    async def on_join(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        if room in self.rooms:
            # Joined already: answer again (membership re-checked), the cursor stays as it is.
            answer = (await reads.join_rooms(self.user_id, [room]))[room]
            if isinstance(answer, ProtocolError):
                raise ProtocolError(answer.code, answer.message, ref)
            await self._push_joined(room, answer, ref)
            return
        cursors = await self._attach_many({room: None}, ref)
        if room in cursors:
            self._release(room, cursors[room])
            await self._arrive_many(cursors)

    async def _push_joined(self, room: int, info: dict[str, Any], ref: str | None) -> None:
        self._push_joined_now(room, info, await PRESENCE.online(room), ref)

    def _push_joined_now(self, room: int, info: dict[str, Any], online: Online, ref: str | None) -> None:
        users, count = online
        if all(user["id"] != self.user_id for user in users):
            # Marked online only after `joined`: count this user in, and list it while the list
            # has room (best effort: a crowded room's count may include a second socket of it).
            count += 1
            if len(users) < CONFIG.presence_max:
                users = [*users, self._me()]
        self.push({"type": "joined", "room": room, "info": info, "online": users, "online_count": count, "ref": ref})

    async def on_leave(self, frame: dict[str, Any], ref: str | None) -> None:
        await self._detach(frame["room"])
        self.push({"type": "left", "room": frame["room"], "ref": ref})

    async def on_resume(self, frame: dict[str, Any], ref: str | None) -> None:
        wanted = {int(key): last_seq for key, last_seq in frame["rooms"].items()}
        again: dict[int, Cursor] = {}
        for room, seq in wanted.items():
            cursor = self.rooms.get(room)
            if cursor is not None and cursor.rewind(seq):
                again[room] = cursor
        if again:
            self._spawn(self._fill(again, announce=True))
        new = {room: seq for room, seq in wanted.items() if room not in self.rooms}
        cursors = await self._attach_many(new, ref)
        if cursors:
            # joined (sent), then the missed messages, then resumed: a client can rebuild each room.
            self._spawn(self._fill(cursors, announce=True))
            await self._arrive_many(cursors)

    async def on_send(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        self._joined(room)
        message: contract.PersistMessage = {
            "type": "persist.message",
            "room": room,
            "sender": self.user_id,
            "body": frame["body"],
            "kind": "text",
            "client_msg_id": frame["client_msg_id"],
            "reply_to": contract.reply_address(process_id(), self.key),
            "queued_at": time.time(),
        }
        try:
            await get_channel_layer().send(contract.PERSIST_CHANNEL, message)
        except ChannelFull:
            raise ProtocolError(ErrorCode.BUSY, "the server is busy; retry this send later", ref) from None
        metrics.MESSAGES_IN.inc()

    async def on_typing(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        cursor = self._joined(room)
        now = time.monotonic()
        if now - cursor.typed_at < CONFIG.typing_interval:
            return  # the room already knows: typing is a state, not an event to repeat
        cursor.typed_at = now
        await fanout.publish(room, None, dumps({"type": "typing", "room": room, "user": self._me()}))

    async def on_read(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        cursor = self._joined(room)
        seq = await database_sync_to_async(services.mark_read)(self.user_id, room, frame["seq"])
        wait = cursor.read_at + CONFIG.read_interval - time.monotonic()
        if wait > 0:
            # Coalesced, not dropped: the room hears the latest marker once the interval is over.
            if cursor.read_seq is None:
                asyncio.get_running_loop().call_later(wait, self._spawn_read, room, cursor)
            cursor.read_seq = seq
            return
        await self._publish_read(room, cursor, seq)

    def _spawn_read(self, room: int, cursor: Cursor) -> None:
        seq, cursor.read_seq = cursor.read_seq, None
        if seq is not None and self.rooms.get(room) is cursor and not self.closing:
            self._spawn(self._publish_read(room, cursor, seq))

    async def _publish_read(self, room: int, cursor: Cursor, seq: int) -> None:
        cursor.read_at = time.monotonic()
        await fanout.publish(room, None, dumps({"type": "read", "room": room, "user": self._me(), "seq": seq}))

    async def on_history(self, frame: dict[str, Any], ref: str | None) -> None:
        room = frame["room"]
        limit = min(frame.get("limit", 50), CONFIG.history_max)
        # Room for the envelope around the messages, so the whole frame stays under the bound.
        budget = CONFIG.max_frame_bytes - 1024
        messages, has_more = await database_sync_to_async(services.history)(
            self.user_id, room, frame.get("before_seq"), limit, budget
        )
        self.push({"type": "history", "room": room, "messages": messages, "has_more": has_more, "ref": ref})
