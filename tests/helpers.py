"""Test helpers: users with tokens, and a real WebSocket client for server processes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import websockets
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model

from chat.tokens import create_token

# The hand-made WebSocket clients are the load harness's; the tests use the same ones.
from loadtest.floods import masked_frame as client_frame  # noqa: F401
from loadtest.floods import raw_websocket  # noqa: F401


def fetch(url: str) -> str:
    """GET a URL of a server process (blocking: call through asyncio.to_thread in async tests)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def make_user(username: str, password: str = "password-123") -> tuple[Any, str]:
    user = get_user_model().objects.create_user(username=username, password=password)
    return user, create_token(user, "test")[1]


amake_user = database_sync_to_async(make_user)


def record_async_reads(monkeypatch: Any, record: Callable[[str], None]) -> None:
    """Call `record(sql)` for each statement of the protocol process's async reads (`chat.reads_pg`)."""
    from chat import reads_pg

    original = reads_pg._rows

    async def rows(sql: str, params: Any) -> Any:
        record(sql)
        return await original(sql, params)

    monkeypatch.setattr(reads_pg, "_rows", rows)


def record_statements(monkeypatch: Any, record: Callable[[str], None]) -> None:
    """Call `record(sql)` for each statement of either read path: the ORM's cursors (on any
    thread: HTTP, SQLite's handshakes) and the async reads on PostgreSQL."""
    from django.db.backends.utils import CursorWrapper

    original = CursorWrapper.execute

    def execute(cursor: Any, sql: str, params: Any = None) -> Any:
        record(sql)
        return original(cursor, sql, params)

    monkeypatch.setattr(CursorWrapper, "execute", execute)
    record_async_reads(monkeypatch, record)


class WsClient:
    """A real WebSocket client (the `websockets` library) speaking Parley's JSON frames."""

    def __init__(self, socket: websockets.ClientConnection) -> None:
        self.socket = socket
        self.frames: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, port: int, token: str, **kwargs: Any) -> WsClient:
        socket = await websockets.connect(f"ws://127.0.0.1:{port}/ws/?token={token}", **kwargs)
        client = cls(socket)
        hello = await client.expect(lambda f: f["type"] == "hello")
        assert hello["user"]["id"]
        return client

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.socket.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        frame = json.loads(await asyncio.wait_for(self.socket.recv(), timeout))
        self.frames.append(frame)
        return frame

    async def expect(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first frame matching `predicate` (earlier non-matching frames are kept in .frames)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching frame within {timeout}s; got {self.frames[-10:]}")
            try:
                frame = await self.recv(remaining)
            except TimeoutError:
                raise AssertionError(f"no matching frame within {timeout}s; got {self.frames[-10:]}") from None
            if predicate(frame):
                return frame

    async def join(self, room: int) -> dict[str, Any]:
        await self.send({"type": "join", "room": room})
        return await self.expect(lambda f: f["type"] in ("joined", "error") and f.get("room", room) == room)

    async def close(self) -> None:
        await self.socket.close()


def messages_in(frames: list[dict[str, Any]], room: int) -> list[int]:
    return [f["seq"] for f in frames if f["type"] == "message" and f["room"] == room]


def read_for(sock: socket.socket, seconds: float) -> bytes:
    """Whatever the server sent, read for a while or until the server resets the connection (a
    server that gave up on a slow client aborts it once the close handshake times out)."""
    deadline = time.monotonic() + seconds
    stream = b""
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not (chunk := sock.recv(1 << 20)):
                break
            stream += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return stream
