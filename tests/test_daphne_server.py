"""parley.daphne_server: what an open socket keeps alive, and write backpressure, on a real Daphne."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from embedded_redis import free_port
from parley.daphne_server import ApplicationInbox
from stack import wait_http
from tests.helpers import client_frame, fetch, raw_websocket

REPO = Path(__file__).resolve().parent.parent


async def test_inbox_hands_items_over_in_order():
    inbox = ApplicationInbox()
    inbox.put_nowait({"n": 1})
    inbox.put_nowait({"n": 2})
    assert [await inbox.get(), await inbox.get()] == [{"n": 1}, {"n": 2}]
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait({"n": 3})
    assert await asyncio.wait_for(waiting, 1) == {"n": 3}
    assert inbox.qsize() == 0


async def test_a_cancelled_get_loses_nothing():
    inbox = ApplicationInbox()
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait({"n": 1})
    waiting.cancel()  # cancelled after the item arrived, before the reader resumed
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await asyncio.wait_for(inbox.get(), 1) == {"n": 1}


async def test_a_second_concurrent_reader_is_refused():
    inbox = ApplicationInbox()
    first = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one reader"):
        await inbox.get()
    first.cancel()


@contextlib.contextmanager
def running_lean_daphne(tmp_path: Path, *options: str) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "app"), str(REPO)])}
    log = (tmp_path / "daphne.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "parley.daphne_server", "-b", "127.0.0.1", "-p", str(port), *options,
         "tests.daphne_probe_app:app"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def lean_daphne(tmp_path: Path) -> Iterator[int]:
    with running_lean_daphne(tmp_path) as port:
        yield port


def live_objects(port: int) -> dict:
    return json.loads(fetch(f"http://127.0.0.1:{port}/"))


@pytest.mark.slow
async def test_an_open_socket_keeps_no_upgrade_request_objects(lean_daphne):
    sockets = [await websockets.connect(f"ws://127.0.0.1:{lean_daphne}/ws/") for _ in range(20)]
    try:
        for n, ws in enumerate(sockets):
            await ws.send(f"hello {n}")
            assert await asyncio.wait_for(ws.recv(), 5) == f"hello {n}"
        # Daphne forgets an upgraded request on its next once-a-second sweep.
        for _ in range(30):
            report = await asyncio.to_thread(live_objects, lean_daphne)
            counts = report["counts"]
            if counts.get("HTTPChannel", 0) <= 1:
                break
            await asyncio.sleep(0.2)
        assert counts.get("LeanWebSocketProtocol") == 20
        # Only the HTTP request asking for the report has its channel and request objects alive.
        assert counts.get("HTTPChannel", 0) <= 1 and counts.get("WebRequest", 0) <= 1, counts
        assert counts.get("Queue", 0) == 0, counts
        assert report["open_sample"]
        assert report["options_in_instance"] == []
        assert report["handshake_data_in_instance"] == []
        assert report["send_queue_in_instance"] is False
        assert report["producer_is_protocol"] is True, report
        # The sockets still work after the clean-up, both ways, and close cleanly.
        await sockets[0].send("still here")
        assert await asyncio.wait_for(sockets[0].recv(), 5) == "still here"
    finally:
        for ws in sockets:
            await ws.close()
    assert sockets[0].close_code == 1000


@pytest.mark.slow
async def test_an_upgraded_requests_objects_are_freed_without_the_garbage_collector(lean_daphne):
    # They form reference cycles; left to the collector, a connect storm's were frozen by
    # chat.collector before any pass reached them, ~1 KB per socket for ten minutes.
    await asyncio.to_thread(live_objects, lean_daphne)  # start-up garbage collected first
    sockets = [await websockets.connect(f"ws://127.0.0.1:{lean_daphne}/ws/") for _ in range(20)]
    try:
        await asyncio.sleep(2.5)  # Daphne forgets upgraded requests in its once-a-second sweep
        report = await asyncio.to_thread(live_objects, lean_daphne)
        # Before: ~22 per socket (HTTPChannel, WebRequest, headers, addresses, buffers, lists).
        assert report["unreachable_found"] < 20, report
        for n, ws in enumerate(sockets):  # and the sockets still work both ways
            await ws.send(f"after {n}")
            assert await asyncio.wait_for(ws.recv(), 5) == f"after {n}"
    finally:
        for ws in sockets:
            await ws.close()


def server_texts(stream: bytes) -> list[str]:
    """The text frames in what a server sent (unmasked, RFC 6455)."""
    texts, at = [], 0
    while at + 2 <= len(stream):
        length, at = stream[at + 1] & 0x7F, at + 2
        if length == 126:
            length, at = int.from_bytes(stream[at:at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(stream[at:at + 8], "big"), at + 8
        texts.append(stream[at:at + length].decode())
        at += length
    return texts


@pytest.mark.slow
async def test_send_waits_while_a_client_is_not_reading(lean_daphne):
    sock = await asyncio.to_thread(raw_websocket, lean_daphne, "/ws/", None)
    try:
        # 12 MB: beyond what loopback's socket buffers (4 MB at most here) and Twisted's 64 KB hold.
        count, size = 3000, 4000
        sock.sendall(client_frame(f"flood:{count},{size}".encode()))
        await asyncio.sleep(1.5)
        # Nobody reads: the app's send() is waiting, not piling frames into Twisted's buffer.
        stalled = (await asyncio.to_thread(live_objects, lean_daphne))["flood_sent"]
        assert 0 < stalled < count
        await asyncio.sleep(0.5)
        assert (await asyncio.to_thread(live_objects, lean_daphne))["flood_sent"] == stalled
        # Reading resumes the sends; every frame arrives, in order.
        stream = b""
        sock.settimeout(20)
        while b"flood done" not in stream[-16:]:
            chunk = await asyncio.to_thread(sock.recv, 1 << 20)
            assert chunk, "server closed the socket"
            stream += chunk
    finally:
        sock.close()
    texts = server_texts(stream)
    assert texts[-1] == "flood done"
    assert [int(text.split(":", 1)[0]) for text in texts[:-1]] == list(range(count))


def test_autobahn_still_formats_its_options_per_connection_through_the_name_we_replace():
    """`skip_option_dump` replaces `autobahn.websocket.protocol.pformat`: if an upgrade stops
    calling it there, the patch is dead weight and should go (or move)."""
    import inspect

    import autobahn.websocket.protocol as autobahn_protocol

    from parley.daphne_server import skip_option_dump

    assert "pformat(configAttrLog)" in inspect.getsource(autobahn_protocol.WebSocketProtocol._connectionMade)
    original = autobahn_protocol.pformat
    try:
        skip_option_dump()
        assert autobahn_protocol.pformat([("openHandshakeTimeout", 5, "x")]).startswith("(not formatted")
    finally:
        autobahn_protocol.pformat = original


def test_autobahn_still_highlights_through_the_names_we_replace():
    """`skip_log_highlighting` replaces `hltype`/`hlval` in the modules that call them per frame:
    if an upgrade calls them elsewhere, or not at all, the patch should follow."""
    import inspect

    from parley.daphne_server import HIGHLIGHTING_MODULES, skip_log_highlighting

    protocol, twisted = HIGHLIGHTING_MODULES
    assert "hltype(self.sendData)" in inspect.getsource(protocol.WebSocketProtocol.sendData)
    assert "hlval(len(data))" in inspect.getsource(twisted.WebSocketAdapterProtocol.dataReceived)
    originals = [(module, module.hltype, module.hlval) for module in HIGHLIGHTING_MODULES]
    try:
        skip_log_highlighting()
        for module in HIGHLIGHTING_MODULES:
            assert module.hlval(42) == 42 and module.hltype(len) is len
    finally:
        for module, hltype, hlval in originals:
            module.hltype, module.hlval = hltype, hlval


async def test_frames_go_out_at_once_when_the_server_can_and_in_order_when_it_cannot():
    """The consumer writes through the server's `write_now` while nothing waits, and falls back
    to its outbox (and stays there until it is written out) as soon as the server says no."""
    from chat.consumers import ChatConsumer

    written: list[str] = []
    accepting = [True]

    def write_now(text: str) -> bool:
        if accepting[0]:
            written.append(f"now:{text}")
        return accepting[0]

    async def base_send(message: dict) -> None:
        written.append(f"sent:{message['text']}")

    consumer = ChatConsumer()
    consumer.base_send, consumer.write_now, consumer.outbox, consumer.key = base_send, write_now, None, 1
    consumer.push_text("a")
    assert written == ["now:a"] and consumer.outbox is None  # no queue, no task
    accepting[0] = False
    consumer.push_text("b")
    accepting[0] = True
    consumer.push_text("c")  # behind "b": through the outbox, not ahead of it
    await asyncio.wait_for(consumer.outbox.writer, 5)  # written out, then let go
    assert consumer.outbox is None
    assert written == ["now:a", "sent:b", "sent:c"]
    consumer.push_text("d")
    assert written[-1] == "now:d"


@pytest.mark.slow
async def test_frames_larger_than_the_client_frame_limit_reach_the_client(lean_daphne):
    """The 64 KiB limit is for what clients send; a 200 KB frame of the server's (a history
    page) goes out whole (autobahn applied the limit to sends too: the socket was closed)."""
    async with websockets.connect(f"ws://127.0.0.1:{lean_daphne}/ws/", max_size=2**20) as ws:
        await ws.send("flood:2,200000")
        frames = [await asyncio.wait_for(ws.recv(), 10) for _ in range(3)]
    assert [len(f) for f in frames[:2]] == [200002, 200002] and frames[2] == "flood done"


def ping_times(sockets: list[socket.socket], seconds: float) -> list[list[float]]:
    """When the server's pings reached each of these idle clients, over `seconds` (monotonic)."""
    times: list[list[float]] = [[] for _ in sockets]
    streams = [b""] * len(sockets)
    with selectors.DefaultSelector() as selector:
        for n, sock in enumerate(sockets):
            selector.register(sock, selectors.EVENT_READ, n)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                n = key.data
                chunk = sockets[n].recv(4096)
                assert chunk, "server closed the socket"
                stream = streams[n] + chunk
                while len(stream) >= 2 and len(stream) >= 2 + (stream[1] & 0x7F):  # short frames only
                    if stream[0] & 0x0F == 0x9:  # ping
                        times[n].append(time.monotonic())
                    stream = stream[2 + (stream[1] & 0x7F):]
                streams[n] = stream
    return times


@pytest.mark.slow
async def test_sockets_opened_together_are_not_pinged_together(tmp_path):
    # Stock Daphne pings every socket idle for --ping-interval in one pass: sockets that connect
    # together (a deploy, a drained pod's clients) are pinged in one burst, a pause of the event
    # loop that grows with them (docs/benchmarks.md). Here the first pings spread over the
    # interval, and each socket is still pinged about once per interval.
    interval, count, watch = 2, 30, 6.5
    with running_lean_daphne(tmp_path, "--ping-interval", str(interval)) as port:
        sockets = [await asyncio.to_thread(raw_websocket, port, "/ws/", None) for _ in range(count)]
        opened = time.monotonic()
        try:
            pings = await asyncio.to_thread(ping_times, sockets, watch)
        finally:
            for sock in sockets:
                sock.close()
    assert all(pings), "an idle socket was never pinged"
    firsts = sorted(times[0] - opened for times in pings)
    # All within the first interval plus one timeout round (2 s), spread over most of it.
    assert firsts[-1] <= interval + 2 + 0.5, firsts
    assert firsts[-1] - firsts[0] >= interval / 2, firsts
    # No burst: at most a few sockets' first pings within any 0.1 s.
    assert max(sum(1 for t in firsts if start <= t < start + 0.1) for start in firsts) <= 8, firsts
    for times in pings:
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(interval - 0.2 <= gap <= interval + 2 + 0.5 for gap in gaps), gaps


@pytest.mark.slow
async def test_the_access_log_has_one_line_per_socket_event_in_daphnes_format(tmp_path):
    with running_lean_daphne(tmp_path) as port:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/") as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 5) == "hi"
        await asyncio.sleep(0.5)  # the server logs the disconnect
    lines = [line for line in (tmp_path / "daphne.log").read_text().splitlines() if '"WS' in line]
    entry = re.compile(r'^127\.0\.0\.1:\d+ - - \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d\] "(\w+) /ws/" - -$')
    assert [entry.match(line).group(1) for line in lines] == ["WSCONNECT", "WSDISCONNECT"], lines


@pytest.fixture
def tcp_transport() -> Iterator[tuple[Any, socket.socket]]:
    """A real Twisted TCP transport on one end of a socket pair, under a reactor that never runs:
    whatever reaches the other end was sent at once, not by the reactor's write pass."""
    from twisted.internet.protocol import Protocol
    from twisted.internet.tcp import Server
    from twisted.internet.testing import MemoryReactor

    class Port:
        _realPortNumber = 0

    ours, peer = socket.socketpair()
    ours.setblocking(False)
    yield Server(ours, Protocol(), ("127.0.0.1", 1), Port(), 1, MemoryReactor()), peer
    ours.close()
    peer.close()


def test_a_frame_to_a_socket_with_nothing_buffered_is_sent_at_once(tcp_transport):
    from parley.daphne_server import send_at_once

    transport, peer = tcp_transport
    assert send_at_once(transport, b"first frame")
    assert peer.recv(100) == b"first frame"
    assert transport._tempDataLen == 0 and not transport.dataBuffer


def test_what_the_kernel_does_not_take_is_buffered_and_later_frames_queue_behind_it(tcp_transport):
    from parley.daphne_server import send_at_once

    transport, peer = tcp_transport
    big = bytes(range(256)) * 40_000  # 10 MB: more than a socket pair's buffers hold
    assert send_at_once(transport, big)
    assert transport._tempDataLen > 0  # the rest waits in Twisted's buffer...
    assert not send_at_once(transport, b"later")  # ...and a later frame may not overtake it
    transport.write(b"later")
    received = b""
    peer.settimeout(5)
    while len(received) < len(big) + 5:
        transport.doWrite()  # the reactor's write pass, by hand
        received += peer.recv(1 << 20)
    assert received == big + b"later"


def test_a_closing_transport_is_left_to_twisted(tcp_transport):
    from parley.daphne_server import send_at_once

    transport, _peer = tcp_transport
    transport.disconnecting = True
    assert not send_at_once(transport, b"frame")


def test_a_sync_send_still_goes_through_autobahns_queue_in_order(tcp_transport):
    """The queue is made again for the sends that need it (chopped, `sync`), and frames keep
    their order behind it."""
    from parley.daphne_server import LeanWebSocketProtocol

    transport, _peer = tcp_transport
    protocol = LeanWebSocketProtocol()
    protocol.transport = transport
    protocol.state = protocol.STATE_OPEN
    protocol.trafficStats = type("Stats", (), {"outgoingOctetsWireLevel": 0})()
    protocol.logOctets = False
    protocol._trigger = lambda: None  # autobahn's sender of the queue, which needs a reactor
    assert "send_queue" not in vars(protocol) and not protocol.send_queue
    protocol.sendData(b"queued ", sync=True)
    assert list(protocol.send_queue) == [(b"queued ", True)]
    protocol.sendData(b"after")  # a later frame may not overtake the queued one
    assert list(protocol.send_queue) == [(b"queued ", True), (b"after", False)]
