"""Daphne with lean per-connection state: `parley protocol` runs this instead of `python -m daphne`.

Same command line, same protocol behaviour. What changes is what an open WebSocket keeps alive
for its whole life (tracemalloc on 2,000 idle sockets, `loadtest/bench.py` for the totals):

- Daphne gives every connection an `asyncio.Queue` for the ASGI `receive()`: three deques, an
  Event and their dicts, about 3 KB. `ApplicationInbox` does the same job for one reader in a few
  hundred bytes.
- The HTTP objects of the upgrade request (Twisted's `HTTPChannel`, Daphne's `WebRequest`, their
  header tables, body buffer and addresses) stay reachable from the transport's producer slot
  until the socket closes. Once the WebSocket is open they are released and the WebSocket
  protocol itself becomes the producer, which also gives Daphne write backpressure (below).
- autobahn copies some 45 factory options into each protocol's `__dict__`; they are the same for
  every connection, so a per-factory subclass carries them as class attributes.
- Handshake-only data (the raw request, parsed headers, the response text, Daphne's header list)
  is dropped once the handshake is done.
- Those HTTP objects are in reference cycles (~22 objects per socket): once Daphne forgets the
  request, the cycles are broken so that they are freed at once. Left to the collector, a
  connect storm's were frozen by `chat.collector` first and held for ten minutes (~0.8 KB per
  socket in `make bench`).
- autobahn's send queue (an empty deque, 760 bytes) is dropped while empty; Daphne's sends never
  use it.

Keepalive pings, spread out: Daphne pings a socket that has been idle for `--ping-interval`
(20 s), checking every connection in one pass every 2 s. Sockets that connect together (a
deploy, a drained pod's clients, `make bench`'s 2,000) are then pinged together, and their pongs
answered together: one burst of ~100 us per socket. At 2,000 sockets that stopped the event loop
for 120-290 ms every 20 s, and failed `make bench` at 1,000 deliveries/s with the CPU at 25 %,
Parley and the hub on stock Daphne alike (py-spy and a stall watchdog: `docs/benchmarks.md`). Here
each socket's first ping comes at a random point of its first interval, and the timeout pass is
cut into `TIMEOUT_SLICES` slices run one after another over the same 2 s: a burst is at most a
few dozen sockets' pings wherever the sockets came from.

Writes at once: Twisted buffers every write and sends it on the reactor's next pass, which
costs two `epoll_ctl` calls (watch for writable, then stop) and a dispatch through Twisted's log
context per socket written: 18 % of a join storm's CPU (py-spy). A frame to a socket with
nothing buffered is sent here at once, as asyncio's transports do; only what the kernel does not
take goes through Twisted's buffer, behind which later frames then queue, in order.

Write backpressure: Twisted never blocks a write, it buffers. When a socket's kernel buffer and
Twisted's 64 KB buffer are full, the transport pauses its producer; here that makes the ASGI
`send()` wait until the client reads again, so the app's own bounded outbox (see
`chat.consumers`) fills and the slow client is closed with 4008 instead of buffering without end.

Everything here relies on Daphne, autobahn and Twisted internals at the versions pinned in
requirements.txt; `tests/test_daphne_server.py` checks each assumption, so an upgrade that breaks
one fails the tests rather than a deployment.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import deque
from functools import partial
from typing import Any

import autobahn.twisted.websocket as autobahn_twisted
import autobahn.websocket.protocol as autobahn_protocol
import daphne.server
from daphne.access import AccessLogGenerator
from daphne.cli import CommandLineInterface
from daphne.server import Server
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from twisted.internet.tcp import Server as TCP_SERVER
from twisted.web.http import HTTPChannel

from chat import contract
from parley.config import CONFIG

# Attributes only the opening handshake reads (autobahn's server side and Daphne's onConnect).
HANDSHAKE_ONLY = (
    "http_headers", "http_request_data", "http_response_data", "http_request_params",
    "http_status_line", "http_request_uri", "http_request_path", "http_request_host",
    "http_headers_cnt", "_wskey", "clean_headers", "application_deferred", "websocket_origin",
    "websocket_protocols", "websocket_extensions",
)


# Events queued beyond the inbox limit, as a multiple of it, before a flooding client is cut off.
OVERFLOW_FACTOR = 4
# WebSocket "policy violation": the client broke the rules (docs/protocol.md, close codes).
CLOSE_FLOODING = 1008
# Daphne checks every connection's timeouts and keepalive ping once per this many seconds.
TIMEOUT_ROUND_SECONDS = 2.0
# ...in this many slices, one every 0.1 s: with 10,000 sockets pinged every 20 s, a slice holds
# ~25 due pings (a few ms of the loop) where one pass held them all.
TIMEOUT_SLICES = 20


class ApplicationInbox:
    """The ASGI `receive()` of one connection: Daphne puts events, one application task gets them.

    Bounded: when `limit` events wait, reading from the client's socket pauses (TCP then pushes
    back on the client) until the application has taken half of them. Twisted would otherwise
    read and decode frames into memory as fast as a hostile client sends them.
    """

    __slots__ = ("_items", "_paused", "_waiter", "limit", "protocol")

    def __init__(self, protocol: Any = None, limit: int = 0) -> None:
        self._items: deque[dict[str, Any]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.protocol = protocol
        self.limit = limit
        self._paused = False

    def put_nowait(self, item: dict[str, Any]) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        if self.limit and len(self._items) >= self.limit and self.protocol is not None:
            if not self._paused:
                self._paused = True
                self.protocol.transport.pauseProducing()
            elif len(self._items) >= self.limit * OVERFLOW_FACTOR:
                # Pausing stops new reads, but autobahn still parses every frame of the data
                # already read (up to 64 KB: thousands of tiny frames, hundreds of ms of this
                # event loop). A client that keeps the inbox this full is flooding: cut it off.
                self.protocol._fail_connection(CLOSE_FLOODING, "client sends frames faster than they are served")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> dict[str, Any]:
        # Items stay queued until taken, so a cancelled get() loses nothing.
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("ApplicationInbox has one reader; get() is already waiting")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = self._items
        item = items.popleft()
        if self._paused and len(items) <= self.limit // 2:
            self._paused = False
            self.protocol.transport.resumeProducing()
        if not items:
            self._items = None
        return item

    def qsize(self) -> int:
        return len(self._items) if self._items else 0


class OpenRequest:
    """What Daphne still reads from the handshake request once the socket is open: its path."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


class LeanWebSocketProtocol(WebSocketProtocol):
    # Class defaults: an attribute set on every instance costs a dict slot per connection.
    write_paused = False
    _writable: asyncio.Future[None] | None = None
    # autobahn's queue of chopped and `sync` sends, which Daphne never makes: an empty deque is
    # 760 bytes, on every open socket. It is made again when such a send comes (`sendData`).
    send_queue: Any = ()

    def onOpen(self) -> None:
        super().onOpen()
        # The first keepalive ping at a random point of the first interval, not at the same
        # instant for every socket that connected in the same second (module docstring).
        self.last_ping = time.time() - random.random() * self.server.ping_interval
        self.request = OpenRequest(self.request.path)
        for name in HANDSHAKE_ONLY:
            self.__dict__.pop(name, None)
        if not self.send_queue:
            del self.send_queue  # the class's empty tuple stands in (see the class attribute)
        self._adopt_transport()
        # A dict never shrinks when keys are removed; a copy is sized for what is left.
        self.__dict__ = dict(self.__dict__)

    def _adopt_transport(self) -> None:
        """Release the upgrade's HTTP objects and become the transport's producer."""
        transport = self.transport
        if isinstance(getattr(transport, "producer", None), HTTPChannel):
            # After the upgrade the HTTPChannel only relays pause/resume to nobody (its request
            # never finishes); it and its WebRequest stay alive through this reference alone.
            channel = transport.producer
            transport.unregisterProducer()
            transport.registerProducer(self, True)
            if isinstance(self.server, LeanServer):
                self.server.upgraded.append((channel, list(channel.requests)))

    # IPushProducer, called by the transport when its write buffer fills and drains.
    def pauseProducing(self) -> None:
        self.write_paused = True

    def resumeProducing(self) -> None:
        self.write_paused = False
        self._wake_writers()

    def stopProducing(self) -> None:
        self.write_paused = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def sendMessage(self, payload: bytes, isBinary: bool = False, *args: Any, **kwargs: Any) -> None:
        """autobahn applies `maxMessagePayloadSize` to what the server sends as well as to what it
        receives. That limit (PARLEY_WS_MAX_SIZE, 64 KiB) is for clients' frames; Parley's own are
        bounded by PARLEY_MAX_FRAME_BYTES (a history page may be up to that): let them out.
        Before this, a history page over 64 KiB failed to send and closed its socket with 4011."""
        if not 0 < self.maxMessagePayloadSize < len(payload):
            return super().sendMessage(payload, isBinary, *args, **kwargs)
        self.maxMessagePayloadSize = 0  # shadows the class option for this one message
        try:
            return super().sendMessage(payload, isBinary, *args, **kwargs)
        finally:
            del self.maxMessagePayloadSize

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """autobahn's sendData, with the bytes sent at once when nothing waits before them
        (module docstring). Queued and chopped sends keep autobahn's path."""
        if sync or chopsize or self.send_queue:
            if not self.send_queue:
                self.send_queue = deque()
            return super().sendData(data, sync, chopsize)
        transport = self.transport
        if not send_at_once(transport, data):
            transport.write(data)
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        return None

    def write_now(self, text: str) -> bool:
        """Write a text frame at once if it can go without waiting (the socket is open and
        Twisted's buffer is not full); False leaves it to the ASGI `send()`. The consumer's
        outbox then needs no writer task for a frame to an idle socket, the common case: that
        task was ~15 % of a fan-out's CPU (py-spy, docs/benchmarks.md). Offered to the app as
        the scope extension `chat.contract.WRITE_NOW_EXTENSION`."""
        if self.write_paused or self.state != self.STATE_OPEN:
            return False
        self.sendMessage(text.encode(), False)
        return True

    async def until_writable(self) -> None:
        while self.write_paused:
            if self._writable is None:
                self._writable = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._writable)


def send_at_once(transport: Any, data: bytes) -> bool:
    """Send `data` on a plain TCP transport that has nothing buffered; what the kernel does not
    take is handed to Twisted's buffer. False (nothing done) when the transport is not one, has
    bytes waiting, is closing, or the send fails: Twisted's own write path then takes the data,
    and meets the error the way it handles errors."""
    if (
        transport.__class__ is not TCP_SERVER or transport.TLS or not transport.connected
        or transport.disconnecting or transport._writeDisconnected
        or transport._tempDataBuffer or transport.offset != len(transport.dataBuffer)
    ):
        return False
    try:
        sent = transport.socket.send(data)
    except OSError:  # EAGAIN included: all of it goes through the buffer
        return False
    if sent < len(data):
        transport.write(data[sent:])
    return True


class LeanWebSocketFactory(WebSocketFactory):
    """Builds protocols of a subclass that holds this factory's options as class attributes."""

    _options_class: type[LeanWebSocketProtocol] | None = None

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        super().setProtocolOptions(*args, **kwargs)
        self._options_class = None

    def buildProtocol(self, addr: Any) -> LeanWebSocketProtocol:
        if self._options_class is None:
            # autobahn's _connectionMade copies an option into the instance only when the
            # instance does not already have it: class attributes make that a no-op.
            # (Callables such as perMessageCompressionAccept must not become bound methods.)
            options = {
                name: staticmethod(value) if callable(value) else value
                for name in LeanWebSocketProtocol.CONFIG_ATTRS
                for value in (getattr(self, name),)
            }
            self._options_class = type("LeanWebSocketProtocol", (LeanWebSocketProtocol,), options)
            self.protocol = self._options_class
        return super().buildProtocol(addr)


def skip_option_dump() -> None:
    """autobahn pretty-prints its ~45 options on every connection for a debug line that is then
    dropped (the text is built before the logger decides): ~4 % of a protocol process's CPU in
    a connect storm (py-spy: 62 of 1,412 samples). Parley never logs autobahn at debug level."""
    autobahn_protocol.pformat = lambda _options: "(not formatted: parley.daphne_server.skip_option_dump)"


def _unhighlighted(value: Any, *_args: Any, **_kwargs: Any) -> Any:
    return value


# autobahn modules that call the highlighters by their imported names, on every frame.
HIGHLIGHTING_MODULES = (autobahn_protocol, autobahn_twisted)


def skip_log_highlighting() -> None:
    """autobahn colours the arguments of its debug lines (`hltype`, `hlval`: `inspect` and
    `click.style`, four calls) on every frame sent and every read, before the logger drops the
    line: ~3 % of a protocol process's CPU in a resume storm (py-spy: 148 of 4,998 samples, as
    much again per delivery in fan-out). The values are passed through as they are instead."""
    for module in HIGHLIGHTING_MODULES:
        module.hltype = _unhighlighted
        module.hlval = _unhighlighted


class LeanAccessLog(AccessLogGenerator):
    """Daphne's access log, in the same format, at a third of the cost per socket: ~5 % of a
    connect storm's CPU went to three lines per socket, each with its own strftime (py-spy:
    126 of 2,457 samples). `WSCONNECTING` is left out: `WSCONNECT` or `WSREJECT` follows it
    within the handshake, and a handshake that never ends still shows as `WSDISCONNECT`. The
    timestamp, to the second, is formatted once per second."""

    _second = -1
    _stamp = ""

    def __call__(self, protocol: str, action: str, details: dict[str, Any]) -> None:
        if protocol == "websocket" and action == "connecting":
            return
        super().__call__(protocol, action, details)

    def write_entry(self, host: Any, date: Any, request: str, status: Any = None, length: Any = None,
                    ident: Any = None, user: Any = None) -> None:
        second = int(time.time())
        if second != self._second:
            self._second, self._stamp = second, date.strftime("%d/%b/%Y:%H:%M:%S")
        self.stream.write(f'{host} {ident or "-"} {user or "-"} [{self._stamp}] "{request}" {status or "-"} '
                          f'{length or "-"}\n')


def break_cycles(objects: list[Any]) -> None:
    """Empty the instance dicts of objects nothing will use again: the reference cycles between
    them (an HTTPChannel and its WebRequest, their headers, buffers and callbacks) go, and
    reference counting frees them at once instead of the garbage collector, later."""
    for obj in objects:
        obj.__dict__.clear()


class LeanServer(Server):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Upgraded sockets' HTTP objects, until Daphne forgets the request (its once-a-second
        # sweep). Those objects form reference cycles, ~20 objects per socket: left to the
        # collector, a connect storm's were frozen by `chat.collector` before any pass reached
        # them and held until its ten-minute full pass (~1 KB per socket of idle memory).
        self.upgraded: list[tuple[HTTPChannel, list[Any]]] = []
        if type(self.action_logger) is AccessLogGenerator:
            self.action_logger = LeanAccessLog(self.action_logger.stream)
        # Near the protocol's own frame limit, not Daphne's 1 MiB: autobahn closes with 1009
        # before buffering more of a frame no valid client sends.
        self.websocket_max_message_size = CONFIG.ws_max_bytes
        self.websocket_max_frame_size = CONFIG.ws_max_bytes

    _timeout_slice = 0
    _timeout_round: list[Any] = []

    def timeout_checker(self) -> None:
        """Daphne's timeout pass, one slice of the connections at a time (module docstring).
        The round's connections are listed once, at its first slice: each is checked once per
        `TIMEOUT_ROUND_SECONDS` (one that connects mid-round waits for the next, as in
        Daphne's own pass), and the list is not copied again for every slice."""
        part = self._timeout_slice
        if part == 0:
            self._timeout_round = list(self.connections)
        protocols, count = self._timeout_round, len(self._timeout_round)
        for protocol in protocols[part * count // TIMEOUT_SLICES:(part + 1) * count // TIMEOUT_SLICES]:
            if protocol in self.connections:  # not forgotten by Daphne since the round began
                protocol.check_timeouts()
        self._timeout_slice = (part + 1) % TIMEOUT_SLICES
        # Daphne's reactor (importing twisted's here could install the default one first).
        daphne.server.reactor.callLater(TIMEOUT_ROUND_SECONDS / TIMEOUT_SLICES, self.timeout_checker)

    def application_checker(self) -> None:
        super().application_checker()
        waiting = []
        for channel, requests in self.upgraded:
            if any(request in self.connections for request in requests):
                waiting.append((channel, requests))
            else:
                break_cycles([channel, *requests])
        self.upgraded = waiting

    def run(self) -> None:
        # Daphne builds its WebSocket factory inside run(), by the module-level name.
        daphne.server.WebSocketFactory = LeanWebSocketFactory
        skip_option_dump()
        skip_log_highlighting()
        super().run()

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> ApplicationInbox | None:
        # Daphne's own create_application, with ApplicationInbox in place of asyncio.Queue.
        assert "application_instance" not in self.connections[protocol]
        websocket = scope.get("type") == "websocket"
        inbox = ApplicationInbox(protocol if websocket else None, CONFIG.inbox_frames)
        if websocket and isinstance(protocol, LeanWebSocketProtocol):
            scope.setdefault("extensions", {})[contract.WRITE_NOW_EXTENSION] = protocol.write_now
        scope.setdefault("asgi", {"version": "3.0"})
        instance = self.application(scope=scope, receive=inbox.get, send=partial(self.handle_reply, protocol))
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(
            instance, loop=asyncio.get_event_loop()
        )
        return inbox

    async def handle_reply(self, protocol: Any, message: dict[str, Any]) -> None:
        await super().handle_reply(protocol, message)
        # Only sends wait: a close must go out (into the buffer) even to a client that stopped reading.
        if message.get("type") == "websocket.send" and getattr(protocol, "write_paused", False):
            await protocol.until_writable()


class LeanCommandLineInterface(CommandLineInterface):
    server_class = LeanServer


def main() -> None:
    from chat import admin

    admin.enable()
    LeanCommandLineInterface().run(sys.argv[1:])


if __name__ == "__main__":
    # Run the importable module's classes, not this __main__ copy of them.
    from parley import daphne_server

    daphne_server.main()
