"""One Parley WebSocket for a Locust user: connect (hello), send frames, and a reader greenlet.

websocket-client is a blocking client; under Locust, gevent has patched the socket module, so a
blocking `recv()` yields to the other users' greenlets. websocket-client answers the server's
pings only inside `recv()`, so every connection has a greenlet that keeps reading (`_read`) and
hands each frame to the user (`on_frame`), whatever the user's task is doing.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import gevent
import websocket

# Handshake and first-frame timeout. A connect storm against a saturated server queues handshakes
# for seconds; past 30 s a real client would have given up and retried, and so do we.
CONNECT_TIMEOUT_S = 30.0


class Closed(Exception):
    """The connection is gone (closed by either side, or it never opened)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def ws_url(host: str) -> str:
    """Locust's --host (`http(s)://...` or `ws(s)://...`) as Parley's WebSocket URL (`/ws/`)."""
    parts = urlsplit(host if "://" in host else f"http://{host}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"--host must be http(s):// or ws(s)://, not {host!r}")
    return f"{scheme}://{parts.netloc}/ws/"


def _socket_from(url: str, source_address: str, timeout: float) -> socket.socket:
    """A TCP (TLS for wss) connection to the URL's server from a chosen local address: one address
    has ~28,000 ephemeral ports per destination, so large local runs spread over 127.0.0.x."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    sock = socket.create_connection((parts.hostname, port), timeout=timeout, source_address=(source_address, 0))
    if parts.scheme == "wss":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
    return sock


class Connection:
    """A connected socket: `hello` received, a reader greenlet running until it closes."""

    def __init__(self, ws: websocket.WebSocket, hello: dict[str, Any], on_frame: Callable[[dict[str, Any]], None],
                 on_close: Callable[[Closed], None]) -> None:
        self.ws = ws
        self.hello = hello
        self.on_frame = on_frame
        self.on_close = on_close
        self.closed: Closed | None = None
        self.reader = gevent.spawn(self._read)

    @classmethod
    def open(cls, url: str, token: str, on_frame: Callable[[dict[str, Any]], None],
             on_close: Callable[[Closed], None], source_address: str | None = None) -> Connection:
        """Handshake, then wait for `hello`; raises Closed (with the close code) when refused."""
        options: dict[str, Any] = {
            # The header keeps the token out of the URL, and so out of access logs.
            "header": [f"Authorization: Bearer {token}"],
            "timeout": CONNECT_TIMEOUT_S,
            # Parley validates what it sends; checking UTF-8 in Python would cost more than the
            # rest of a frame's handling.
            "skip_utf8_validation": True,
        }
        if source_address:
            options["socket"] = _socket_from(url, source_address, CONNECT_TIMEOUT_S)
        ws = websocket.WebSocket(skip_utf8_validation=True)
        try:
            ws.connect(url, **options)
            first = _recv(ws)
            if isinstance(first, int):
                raise Closed("closed before hello", first)
            frame = json.loads(first)
            if frame.get("type") != "hello":
                # A refused socket gets an error frame, then its close code (4001, 4009, 4029, 4013).
                after = _recv(ws)
                code = after if isinstance(after, int) else None
                raise Closed(f"refused: {frame.get('code', frame.get('type'))}", code)
        except websocket.WebSocketBadStatusException as exc:
            ws.close()
            raise Closed(f"handshake refused: HTTP {exc.status_code}") from exc
        except Closed:
            ws.close()
            raise
        except (OSError, ValueError, websocket.WebSocketException) as exc:
            ws.close()
            raise Closed(f"{type(exc).__name__}: {exc}") from exc
        ws.settimeout(None)  # the reader waits as long as the socket lives
        return cls(ws, frame, on_frame, on_close)

    def send(self, frame: dict[str, Any]) -> None:
        if self.closed is not None:
            raise self.closed
        try:
            self.ws.send(json.dumps(frame, separators=(",", ":")))
        except (OSError, websocket.WebSocketException) as exc:
            raise self._gone(f"send failed: {type(exc).__name__}") from exc

    def close(self) -> None:
        if self.closed is None:
            self.closed = Closed("closed by the client", 1000)
        try:
            self.ws.close(timeout=1)
        except (OSError, websocket.WebSocketException):
            pass
        self.reader.kill(block=False)

    def _gone(self, why: str, code: int | None = None) -> Closed:
        if self.closed is None:
            self.closed = Closed(why, code)
            self.on_close(self.closed)
        return self.closed

    def _read(self) -> None:
        while True:
            try:
                text = _recv(self.ws)
            except (OSError, websocket.WebSocketException) as exc:
                self._gone(f"read failed: {type(exc).__name__}")
                return
            if isinstance(text, int):
                self._gone(f"closed by the server ({text})", text)
                return
            if self.closed is not None:
                # Closed by the client (a reconnect): what was still in this socket's buffer is
                # not news to the user, whose new connection's `resume` gives it in order.
                return
            try:
                frame = json.loads(text)
            except ValueError:
                frame = {"type": "unparseable", "text": text[:200]}
            self.on_frame(frame)


def _recv(ws: websocket.WebSocket) -> str | int:
    """The next text frame, or the close code when the server closed (`recv()` would drop it:
    the code is what tells a client to log in again, back off or resume)."""
    opcode, data = ws.recv_data()
    if opcode == websocket.ABNF.OPCODE_CLOSE:
        payload = data.data if isinstance(data, websocket.ABNF) else data
        return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data


def now_ms() -> float:
    return time.time() * 1000
