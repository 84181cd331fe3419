"""Hostile clients and the normal user measured beside them (docs/security.md).

Each flood is one hostile user doing one thing as hard as the server lets it, for a bounded time
and a bounded number of operations, against a protocol process on 127.0.0.1 only. Beside it a
normal user sends a message every `interval` seconds and measures, per message, send → ack (at
the sender) and send → delivery (at a second member of the room). `loadtest/attacks.py` runs
every flood and prints the table; `tests/test_attacks_live.py` runs short versions and asserts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import secrets
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import websockets

HOST = "127.0.0.1"  # load stays local
# The normal user and the attacker come from different loopback addresses, as they would from
# different machines: per-address limits (handshakes) then apply to each on its own.
NORMAL_ADDR = "127.0.0.2"
ATTACKER_ADDR = "127.0.0.3"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_OPERATIONS = 100_000  # every loop is bounded in count as well as in time


def url(port: int, token: str) -> str:
    return f"ws://{HOST}:{port}/ws/?token={token}"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Latency:
    sent: int = 0
    ack_ms: list[float] = field(default_factory=list)
    delivery_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.sent - len(self.delivery_ms)

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "acked": len(self.ack_ms), "delivered": len(self.delivery_ms), "lost": self.lost,
            "ack_p50_ms": round(percentile(self.ack_ms, 0.5), 1), "ack_p99_ms": round(percentile(self.ack_ms, 0.99), 1),
            "delivery_p50_ms": round(percentile(self.delivery_ms, 0.5), 1),
            "delivery_p99_ms": round(percentile(self.delivery_ms, 0.99), 1),
            "errors": self.errors,
        }


class Refused(Exception):
    """The server answered the handshake with an error frame (and closes with a code)."""


def failure_name(exc: BaseException) -> str:
    """How an attempt ended, for the report: `refused 403` for a handshake refused before the
    upgrade (an address over its handshake rate), else the exception's class."""
    if isinstance(exc, websockets.InvalidStatus):
        return f"refused {exc.response.status_code}"
    return type(exc).__name__


async def _hello(ws: Any) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
    if frame.get("type") != "hello":
        await asyncio.wait_for(ws.wait_closed(), 10)
        raise Refused(str(ws.close_code))
    return frame


async def _join(ws: Any, room: int) -> None:
    await ws.send(json.dumps({"type": "join", "room": room}))
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame.get("type") == "joined" and frame.get("room") == room:
            return
        if frame.get("type") == "error":
            raise RuntimeError(f"join {room}: {frame}")


async def normal_user(port: int, sender: str, reader: str, room: int, seconds: float,
                      interval: float = 0.05, settle: float = 3.0) -> Latency:
    """The user who must not notice the flood: send, ack, delivery, every `interval`."""
    stats = Latency()
    sent_at: dict[str, float] = {}
    async with websockets.connect(url(port, sender), local_addr=(NORMAL_ADDR, 0)) as a, \
            websockets.connect(url(port, reader), local_addr=(NORMAL_ADDR, 0)) as b:
        await _hello(a)
        await _hello(b)
        await _join(a, room)
        await _join(b, room)
        run = secrets.token_hex(3)

        async def read_acks() -> None:
            async for raw in a:
                frame = json.loads(raw)
                if frame.get("type") == "ack" and frame["client_msg_id"] in sent_at:
                    stats.ack_ms.append((time.perf_counter() - sent_at[frame["client_msg_id"]]) * 1000)
                elif frame.get("type") == "error":
                    stats.errors[frame["code"]] = stats.errors.get(frame["code"], 0) + 1

        async def read_deliveries() -> None:
            async for raw in b:
                frame = json.loads(raw)
                if frame.get("type") == "message" and frame.get("client_msg_id") in sent_at:
                    stats.delivery_ms.append((time.perf_counter() - sent_at[frame["client_msg_id"]]) * 1000)

        # Warm up first: the first messages pay for connections and caches being made (a
        # worker's first batch opens its database connection), not for anything a flood does.
        for n in range(5):
            await a.send(json.dumps({"type": "send", "room": room, "body": "warm-up",
                                     "client_msg_id": f"w-{run}-{n}"}))
            while json.loads(await asyncio.wait_for(a.recv(), 30)).get("type") != "ack":
                pass
        readers = [asyncio.create_task(read_acks()), asyncio.create_task(read_deliveries())]
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline and n < MAX_OPERATIONS:
            n += 1
            cid = f"n-{run}-{n}"
            sent_at[cid] = time.perf_counter()
            await a.send(json.dumps({"type": "send", "room": room, "body": f"normal {n}", "client_msg_id": cid}))
            stats.sent += 1
            await asyncio.sleep(interval)
        settle_until = time.monotonic() + settle
        # Polled: the readers append from their own tasks, there is no "all arrived" event.
        while len(stats.delivery_ms) < stats.sent and time.monotonic() < settle_until:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return stats


# --- the floods: each returns what the hostile client saw ----------------------------------------


async def resume_flood(port: int, token: str, rooms: list[int], seconds: float) -> dict[str, Any]:
    """`resume` of every room (500) again and again, reading what comes back."""
    frame = json.dumps({"type": "resume", "rooms": {str(r): 0 for r in rooms}})
    counts: dict[str, int] = {}
    async with websockets.connect(url(port, token), max_size=None, local_addr=(ATTACKER_ADDR, 0)) as ws:
        await _hello(ws)

        async def read() -> None:
            async for raw in ws:
                kind = json.loads(raw)
                key = kind.get("code") or kind.get("type")
                counts[key] = counts.get(key, 0) + 1

        reader = asyncio.create_task(read())
        deadline = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < deadline and sent < MAX_OPERATIONS:
            await ws.send(frame)
            sent += 1
            await asyncio.sleep(0.01)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return {"resumes_sent": sent, "answers": counts}


def masked_frame(payload: bytes) -> bytes:
    """A masked text frame of any length, as RFC 6455 requires from clients."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes([0x81, 0x80 | length])
    elif length < 65536:
        head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_websocket(port: int, path: str, receive_buffer: int | None = 4096,
                  source: str | None = None) -> socket.socket:
    """A WebSocket opened by hand: a client that can stop reading (a tiny receive buffer fills
    sooner, and also keeps the TCP window small for the socket's life; None keeps the default)."""
    sock = socket.create_connection((HOST, port), source_address=(source, 0) if source else None)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"handshake cut off: {response!r}")
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {response!r}")
    return sock


def _nonreader(port: int, token: str, room: int, seconds: float) -> dict[str, Any]:
    sock = raw_websocket(port, f"/ws/?token={token}", source=ATTACKER_ADDR)
    request = masked_frame(json.dumps({"type": "history", "room": room, "limit": 200}).encode())
    sent = 0
    closed_after = None
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    sock.settimeout(1.0)
    try:
        while time.monotonic() < deadline and sent < MAX_OPERATIONS:
            try:
                sock.sendall(request)
            except OSError:
                closed_after = time.monotonic() - start
                break
            sent += 1
            time.sleep(0.02)
    finally:
        sock.close()
    return {"history_requests": sent, "server_closed_after_s": closed_after and round(closed_after, 1)}


async def nonreader_history(port: int, token: str, room: int, seconds: float) -> dict[str, Any]:
    """Pages of the biggest history the room has, asked for and never read."""
    return await asyncio.to_thread(_nonreader, port, token, room, seconds)


async def big_frames(port: int, token: str, seconds: float, size: int = 1 << 20) -> dict[str, Any]:
    """1 MiB text frames, reconnecting after each close."""
    payload = json.dumps({"type": "ping", "ref": "x" * (size - 40)})
    codes: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    attempts = 0
    while time.monotonic() < deadline and attempts < 1000:
        attempts += 1
        try:
            async with websockets.connect(url(port, token), max_size=None, local_addr=(ATTACKER_ADDR, 0)) as ws:
                await _hello(ws)
                await ws.send(payload)
                await asyncio.wait_for(ws.wait_closed(), 10)
                code = str(ws.close_code)
        except Refused as exc:
            code = f"refused {exc}"
            await asyncio.sleep(0.1)  # told to retry later: a persistent attacker does, soon
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            code = failure_name(exc)
        codes[code] = codes.get(code, 0) + 1
    return {"frames": attempts, "close_codes": codes}


async def many_sockets(port: int, token: str, seconds: float, count: int = 200) -> dict[str, Any]:
    """One user opens `count` sockets at once and holds what it gets."""
    outcome: dict[str, int] = {}
    held: list[Any] = []

    async def one() -> None:
        try:
            ws = await websockets.connect(url(port, token), local_addr=(ATTACKER_ADDR, 0))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] == "hello":
                held.append(ws)
                key = "accepted"
            else:
                await asyncio.wait_for(ws.wait_closed(), 10)
                key = f"closed {ws.close_code}"
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            key = failure_name(exc)
        outcome[key] = outcome.get(key, 0) + 1

    await asyncio.gather(*(one() for _ in range(count)))
    await asyncio.sleep(seconds)
    for ws in held:
        await ws.close()
    return outcome


async def invalid_frames(port: int, token: str, seconds: float) -> dict[str, Any]:
    """Garbage as fast as the socket takes it, replies read."""
    garbage = ['{"type":', "[]", '{"type":"nope"}', '{"type":"send","room":"x"}', "\x00" * 50,
               '{"type":"join","room":1e400}', '{"type":"ping","ref":"\\ud800"}']
    codes: dict[str, int] = {}
    async with websockets.connect(url(port, token), local_addr=(ATTACKER_ADDR, 0)) as ws:
        await _hello(ws)

        async def read() -> None:
            async for raw in ws:
                code = json.loads(raw).get("code", "?")
                codes[code] = codes.get(code, 0) + 1

        reader = asyncio.create_task(read())
        deadline = time.monotonic() + seconds
        sent = 0
        try:
            while time.monotonic() < deadline and sent < MAX_OPERATIONS:
                await ws.send(garbage[sent % len(garbage)])
                sent += 1
                if sent % 50 == 0:
                    await asyncio.sleep(0.001)
            await asyncio.sleep(0.5)
        except websockets.ConnectionClosed:
            pass  # cut off for flooding
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return {"frames": sent, "answers": codes, "closed": ws.close_code}


async def typing_flood(port: int, token: str, room: int, seconds: float) -> dict[str, Any]:
    """`typing` in the normal users' room as fast as the rate limit allows."""
    async with websockets.connect(url(port, token), local_addr=(ATTACKER_ADDR, 0)) as ws:
        await _hello(ws)
        await _join(ws, room)
        deadline = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < deadline and sent < MAX_OPERATIONS:
            await ws.send(json.dumps({"type": "typing", "room": room}))
            sent += 1
            await asyncio.sleep(0.002)
    return {"typing_sent": sent}


async def handshake_storm(port: int, seconds: float, concurrency: int = 20) -> dict[str, Any]:
    """Handshakes with random tokens: no account needed, so the cheapest attack there is."""
    codes: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    attempts = 0

    async def worker() -> None:
        nonlocal attempts
        while time.monotonic() < deadline and attempts < 20_000:
            attempts += 1
            try:
                random_token = url(port, secrets.token_urlsafe(32))
                async with websockets.connect(random_token, local_addr=(ATTACKER_ADDR, 0)) as ws:
                    await asyncio.wait_for(ws.wait_closed(), 10)
                    code = str(ws.close_code)
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                code = failure_name(exc)
            codes[code] = codes.get(code, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"handshakes": attempts, "close_codes": codes}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


FLOODS = {
    "resume": resume_flood, "nonreader": nonreader_history, "big_frames": big_frames,
    "sockets": many_sockets, "invalid": invalid_frames, "typing": typing_flood, "handshakes": handshake_storm,
}


async def run_flood(name: str, **kwargs: Any) -> dict[str, Any]:
    """A flood in a process of its own: the attacker's CPU (masking 1 MiB frames, parsing 10,000
    replies) must not be billed to the normal user's measurement in this process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.floods", name, json.dumps(kwargs),
        cwd=str(REPO), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), kwargs.get("seconds", 10) + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"flood {name} failed: {err.decode()[-2000:]}")
    return json.loads(out)


async def beside(name: str, kwargs: dict[str, Any], normal: Any) -> tuple[dict[str, Any], Latency]:
    """Run a flood (in its own process) and the normal user at once; the flood starts first."""
    flood_task = asyncio.create_task(run_flood(name, **kwargs))
    await asyncio.sleep(1.0)  # the flood's interpreter starts and gets going
    latency = await normal
    return await flood_task, latency


if __name__ == "__main__":
    # The attacker's CPU is its own in real life, not the server's: here both share two cores,
    # so the flood runs at the lowest priority and the server gets the cores it would have.
    os.nice(19)
    result = asyncio.run(FLOODS[sys.argv[1]](**json.loads(sys.argv[2])))
    print(json.dumps(result))
