"""A client that behaves as docs/protocol.md tells clients to, recording what it sees in a History.

- It connects to any live protocol process (the cluster's endpoints, as a Service would pick),
  and after any close reconnects with jittered exponential backoff, preferring another process.
- On its first connection it joins its rooms; on every later one it `resume`s them from the last
  seq it has, and fills a `reload` from `history` pages.
- `reconnect {delay_ms}` (a draining server) is obeyed: wait the jittered delay, go elsewhere.
- Each message it sends is kept until acked and re-sent with the same `client_msg_id` after an
  ack timeout, a retryable error (`busy`, `unavailable`, `internal`, `rate_limited`) or a
  reconnect (after the resume, oldest first, so a sender's order holds).
- Senders number their messages per room (`<sender>:<room>:<n>` in the body), so the checker can
  name what was lost, duplicated or reordered.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from faults.history import History, Send

RETRYABLE = frozenset({"busy", "unavailable", "internal", "rate_limited"})
# The `ref` of this client's join and resume frames, so that an error answering one is known.
JOIN_REF = "join"
RESUME_REF = "resume"
# Reconnect backoff: first retry after ~100 ms, doubling to 2 s, full jitter (what the protocol
# doc asks of clients; fast enough that a case's recovery time is the server's, not ours).
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0
# `history` page size when filling a `reload` (the protocol's maximum).
HISTORY_PAGE = 200


def body_for(sender: int, room: int, number: int, padding: str = "") -> str:
    return f"{sender}:{room}:{number}" + (f" {padding}" if padding else "")


def number_in(body: str, sender: int, room: int) -> int | None:
    """The sender's number in a body this harness wrote, else None (bot replies, other tests)."""
    parts = body.split(" ", 1)[0].split(":")
    if len(parts) == 3 and parts[0] == str(sender) and parts[1] == str(room) and parts[2].isdigit():
        return int(parts[2])
    return None


class DocumentedClient:
    def __init__(
        self,
        name: str,
        user_id: int,
        token: str,
        rooms: list[int],
        history: History,
        endpoints: Callable[[], list[int]],
        *,
        tag: str,
        rng: random.Random,
        ack_timeout: float = 3.0,
        window: int = 8,
    ) -> None:
        self.name = name
        self.user_id = user_id
        self.token = token
        self.rooms = rooms
        self.history = history
        self.endpoints = endpoints
        self.tag = tag
        self.rng = rng
        self.ack_timeout = ack_timeout
        self.window = window
        for room in rooms:
            history.view(name, room)
        self.pending: OrderedDict[str, Send] = OrderedDict()  # unacked, oldest first
        self.last_attempt: dict[str, float] = {}
        self.numbers: dict[int, int] = dict.fromkeys(rooms, 0)
        self.socket: websockets.ClientConnection | None = None
        self.port: int | None = None
        self.joined_once = False
        self.awaiting: set[int] = set()  # rooms whose joined/resumed has not come yet
        self.ready = asyncio.Event()  # connected, every room joined or resumed
        self.window_open = asyncio.Event()
        self.window_open.set()
        self.stopping = False
        self.reconnect_after: float | None = None
        self.reloading: dict[int, list[dict[str, Any]]] = {}  # room -> live frames held meanwhile
        self.history_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.resumed_waiters: dict[int, asyncio.Future[None]] = {}
        self.task: asyncio.Task[None] | None = None
        self.connected_since: float | None = None

    # Life cycle.

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"client {self.name}")

    async def stop(self) -> None:
        self.stopping = True
        if self.socket is not None:
            await self.socket.close()
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, 10)
            except (TimeoutError, asyncio.CancelledError):
                self.task.cancel()

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self.stopping:
            if self.reconnect_after is not None:
                await asyncio.sleep(self.reconnect_after)
                self.reconnect_after = None
            port = self._pick_port()
            if port is None:
                await asyncio.sleep(backoff)
                continue
            served = await self._session(port)
            if self.stopping:
                break
            if served:
                backoff = BACKOFF_FIRST
            await asyncio.sleep(self.rng.uniform(0, backoff))
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _pick_port(self) -> int | None:
        ports = self.endpoints()
        if not ports:
            return None
        others = [p for p in ports if p != self.port]
        return self.rng.choice(others or ports)

    async def _session(self, port: int) -> bool:
        """One connection, until it closes. True if it got as far as `hello`."""
        self.port = port
        try:
            socket = await websockets.connect(
                f"ws://127.0.0.1:{port}/ws/?token={self.token}", open_timeout=5, close_timeout=2,
                ping_interval=5, ping_timeout=10, max_size=2**22,
            )
        except (OSError, TimeoutError, InvalidHandshake):
            self.history.connect_failures += 1
            return False
        self.socket = socket
        hello = False
        try:
            first = json.loads(await asyncio.wait_for(socket.recv(), 10))
            if first.get("type") != "hello":
                self.history.errors[first.get("code", first.get("type", "?"))] += 1
                return False
            hello = True
            self.history.events["connects" if not self.joined_once else "reconnects"] += 1
            self.connected_since = time.monotonic()
            await self._enter_rooms()
            async for raw in socket:
                await self._on_frame(json.loads(raw))
        except (ConnectionClosed, OSError, TimeoutError):
            pass
        finally:
            self.ready.clear()
            self.socket = None
            self.connected_since = None
            for waiter in [*self.history_waiters.values(), *self.resumed_waiters.values()]:
                if not waiter.done():
                    waiter.cancel()
            self.history_waiters.clear()
            self.resumed_waiters.clear()
            self.reloading.clear()
            code = socket.close_code
            self.history.closes[str(code)] += 1
        return hello

    async def _enter_rooms(self) -> None:
        assert self.socket is not None
        self.awaiting = set(self.rooms)
        if not self.joined_once:
            for room in self.rooms:
                await self._send({"type": "join", "room": room, "ref": JOIN_REF})
        else:
            self.history.events["resumes"] += 1
            await self._resume(self.rooms)

    async def _resume(self, rooms: list[int]) -> None:
        await self._send({"type": "resume", "ref": RESUME_REF,
                          "rooms": {str(r): self.history.view(self.name, r).have for r in rooms}})

    async def _enter_again(self, rooms: list[int], socket: object) -> None:
        """Re-send the join or resume of `rooms` after a short jittered wait (the server answered
        `unavailable`: a backend blipped), unless the connection changed meanwhile."""
        await asyncio.sleep(self.rng.uniform(0.3, 1.0))
        if self.socket is not socket or self.socket is None:
            return  # the next connection resumes every room anyway
        self.history.events["reentered"] += 1
        try:
            if not self.joined_once:
                for room in rooms:
                    await self._send({"type": "join", "room": room, "ref": JOIN_REF})
            else:
                await self._resume(rooms)
        except (ConnectionClosed, OSError):
            pass

    async def _send(self, frame: dict[str, Any]) -> None:
        if self.socket is not None:
            await self.socket.send(json.dumps(frame))

    # Frames from the server.

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            room = frame["room"]
            if room in self.reloading:
                self.reloading[room].append(frame)
            else:
                send = self.history.sends.get(frame.get("client_msg_id") or "")
                if send is not None and send.sender == frame["sender"]["id"]:
                    self.history.latencies.append(time.monotonic() - send.first_sent)
                self._message(frame)
        elif kind == "ack":
            self._ack(frame)
        elif kind == "joined":
            room = frame["room"]
            view = self.history.view(self.name, room)
            if not self.joined_once and not view.received:
                view.have = frame["info"]["last_seq"]  # older messages are history, not promised live
            if not self.joined_once:
                self._room_ready(room)
        elif kind == "resumed":
            self._room_ready(frame["room"])
        elif kind == "reload":
            self.history.events["reloads"] += 1
            room = frame["room"]
            self.reloading[room] = []
            asyncio.get_running_loop().create_task(self._reload(room, frame["last_seq"]))
        elif kind == "history":
            waiter = self.history_waiters.pop(frame.get("ref") or "", None)
            if waiter is not None and not waiter.done():
                waiter.set_result(frame)
        elif kind == "reconnect":
            self.history.events["told_to_reconnect"] += 1
            # The server jittered the delay already: wait exactly that long.
            self.reconnect_after = frame.get("delay_ms", 1000) / 1000
        elif kind == "error":
            self._error(frame)

    def _room_ready(self, room: int) -> None:
        self.awaiting.discard(room)
        waiter = self.resumed_waiters.pop(room, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self.awaiting and not self.ready.is_set():
            self.joined_once = True
            self.ready.set()
            # Unacked sends go again, oldest first, once every room is back.
            now = time.monotonic()
            for send in list(self.pending.values()):
                self.last_attempt[send.client_msg_id] = now
                asyncio.get_running_loop().create_task(self._transmit(send))

    def _message(self, frame: dict[str, Any]) -> None:
        sender = frame["sender"]["id"]
        room = frame["room"]
        view = self.history.view(self.name, room)
        view.receive(frame["seq"], frame.get("client_msg_id") or "", sender,
                     number_in(frame.get("body", ""), sender, room))

    def _ack(self, frame: dict[str, Any]) -> None:
        send = self.history.acked(frame["client_msg_id"], frame["room"], frame["seq"], frame.get("duplicate", False))
        if send is not None and self.pending.pop(send.client_msg_id, None) is not None:
            self.last_attempt.pop(send.client_msg_id, None)
            if len(self.pending) < self.window:
                self.window_open.set()

    def _error(self, frame: dict[str, Any]) -> None:
        code = frame.get("code", "?")
        self.history.errors[code] += 1
        ref = frame.get("ref") or ""
        send = self.pending.get(ref)
        if send is None:
            room = frame.get("room")
            # A join or resume the server could not serve right now (a shard or the database
            # blipped), or a room whose catch-up failed ("send resume"): ask again shortly. A
            # client that waited for an answer that never comes would never be back in the room.
            if code in RETRYABLE and (ref in (JOIN_REF, RESUME_REF) or room in self.rooms):
                rooms = [room] if room in self.rooms else sorted(self.awaiting)
                if rooms:
                    self.awaiting.update(rooms)
                    asyncio.get_running_loop().create_task(self._enter_again(rooms, self.socket))
            return
        if code in RETRYABLE:
            # Retry after a short jittered wait rather than the full ack timeout.
            self.last_attempt[send.client_msg_id] = time.monotonic() - self.ack_timeout + self.rng.uniform(0.2, 1.0)
        else:
            send.refused = code
            self.pending.pop(send.client_msg_id, None)
            if len(self.pending) < self.window:
                self.window_open.set()

    async def _reload(self, room: int, last_seq: int) -> None:
        """Fill (have, last_seq] from `history` pages (newest first), then the held live frames."""
        view = self.history.view(self.name, room)
        pages: list[dict[str, Any]] = []
        before = last_seq + 1
        try:
            while before > view.have + 1:
                ref = f"h{room}.{before}"
                waiter = asyncio.get_running_loop().create_future()
                self.history_waiters[ref] = waiter
                await self._send({"type": "history", "room": room, "before_seq": before,
                                  "limit": HISTORY_PAGE, "ref": ref})
                page = await asyncio.wait_for(waiter, 10)
                messages = page.get("messages", [])
                if not messages:
                    break
                pages.extend(messages)
                before = min(m["seq"] for m in messages)
                if not page.get("has_more"):
                    break
        except (TimeoutError, asyncio.CancelledError, ConnectionClosed):
            return  # the connection went; the next one resumes from `have`
        for message in sorted(pages, key=lambda m: m["seq"]):
            if message["seq"] > view.have:
                view.reloaded += 1
                self._message({**message, "room": room})
        for frame in self.reloading.pop(room, []):
            self._message(frame)
        self._room_ready(room)

    # Sending.

    async def send_next(self, room: int, padding: str = "") -> Send:
        """Queue this client's next numbered message for `room` (waits while the window is full);
        `padding` makes the body that much longer."""
        while len(self.pending) >= self.window:
            self.window_open.clear()
            await self.window_open.wait()
        self.numbers[room] += 1
        number = self.numbers[room]
        client_msg_id = f"{self.tag}.{self.user_id}.{room}.{number}"
        send = self.history.new_send(client_msg_id, room, self.user_id, number,
                                     body_for(self.user_id, room, number, padding))
        self.pending[client_msg_id] = send
        self.last_attempt[client_msg_id] = time.monotonic()
        if self.ready.is_set():
            await self._transmit(send)
        return send

    async def _transmit(self, send: Send) -> None:
        if send.client_msg_id not in self.pending or self.socket is None:
            return
        send.attempts += 1
        try:
            await self._send({"type": "send", "room": send.room, "body": send.body,
                              "client_msg_id": send.client_msg_id})
        except (ConnectionClosed, OSError):
            pass  # resent after the next resume

    async def retry_due(self) -> None:
        """Re-send what waited longer than the ack timeout (called periodically by the driver)."""
        if not self.ready.is_set():
            return
        now = time.monotonic()
        for send in list(self.pending.values()):
            if now - self.last_attempt.get(send.client_msg_id, now) >= self.ack_timeout:
                self.last_attempt[send.client_msg_id] = now
                await self._transmit(send)

    async def final_resume(self, timeout: float) -> bool:
        """Resume every room on the current connection and wait for each `resumed` (or the reload
        to finish): afterwards the client has everything the server can give."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            return False
        loop = asyncio.get_running_loop()
        waiters = {room: loop.create_future() for room in self.rooms}
        self.resumed_waiters.update(waiters)
        self.awaiting = set(self.rooms)
        try:
            await self._resume(self.rooms)
            await asyncio.wait_for(asyncio.gather(*waiters.values()), timeout)
            return True
        except (TimeoutError, asyncio.CancelledError, ConnectionClosed):
            return False
