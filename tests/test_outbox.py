"""chat.outbox: bounded in frames and characters, closes in order or at once, a writer task only
while something waits, and a failed write reported once. No socket: the "socket" records."""

from __future__ import annotations

import asyncio

from chat.outbox import Outbox


class Socket:
    def __init__(self, block: bool = False, fail_on: str | None = None) -> None:
        self.written: list[str] = []
        self.closed_with: list[int] = []
        self.failures: list[Exception] = []
        self.idle = 0
        self.unblock = asyncio.Event()
        if not block:
            self.unblock.set()
        self.fail_on = fail_on

    async def write_frame(self, text: str) -> None:
        await self.unblock.wait()
        if text == self.fail_on:
            raise OSError("the transport refused the frame")
        self.written.append(text)

    async def close_with(self, code: int) -> None:
        self.closed_with.append(code)

    async def write_failed(self, exc: Exception) -> None:
        self.failures.append(exc)

    def outbox(self, max_frames: int = 10, max_chars: int = 1000) -> Outbox:
        return Outbox(self, max_frames, max_chars)

    def outbox_idle(self, outbox: Outbox) -> None:
        self.idle += 1


async def settle(outbox: Outbox) -> None:
    for _ in range(100):
        if outbox.writer is None:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the writer never finished")


async def test_frames_are_written_in_order_and_the_writer_goes_away():
    socket = Socket()
    outbox = socket.outbox()
    for n in range(5):
        assert outbox.put(f"f{n}")
    await settle(outbox)
    assert socket.written == [f"f{n}" for n in range(5)]
    assert outbox.writer is None and socket.idle == 1 and outbox.chars == 0


async def test_the_bound_counts_frames():
    socket = Socket(block=True)
    outbox = socket.outbox(max_frames=3)
    assert [outbox.put("x") for _ in range(4)] == [True, True, True, False]
    # The writer has not run yet: three wait, the fourth is refused.
    assert outbox.backlog() == 3


async def test_the_bound_counts_characters():
    socket = Socket(block=True)
    outbox = socket.outbox(max_chars=100)
    assert outbox.put("a" * 60)
    assert outbox.put("b" * 40)
    assert not outbox.put("c"), "101 characters would wait: refused"


async def test_close_after_writes_what_waits_then_closes():
    socket = Socket()
    outbox = socket.outbox()
    outbox.put('{"type":"reconnect"}')
    outbox.close_after(4012)
    assert outbox.put("late") is True  # accepted and dropped: the socket is closing
    await settle(outbox)
    assert socket.written == ['{"type":"reconnect"}'] and socket.closed_with == [4012]


async def test_close_now_does_not_wait_behind_a_blocked_write():
    socket = Socket(block=True)
    outbox = socket.outbox()
    outbox.put("stuck")  # the client stopped reading: this write never ends
    outbox.put("queued")
    await asyncio.sleep(0.01)
    outbox.close_now(4008)
    await settle(outbox)
    assert socket.closed_with == [4008]
    assert socket.written == [] and outbox.backlog() == 0


async def test_a_failed_write_is_reported_once_and_nothing_more_is_written():
    socket = Socket(fail_on="bad")
    outbox = socket.outbox()
    for text in ("ok", "bad", "after"):
        outbox.put(text)
    await settle(outbox)
    assert socket.written == ["ok"]
    assert len(socket.failures) == 1 and isinstance(socket.failures[0], OSError)
    assert socket.closed_with == []  # what to close with is the consumer's decision (4011)
