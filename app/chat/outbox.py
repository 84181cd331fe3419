"""Frames waiting to be written to one socket, and the task that writes them.

One per connection, and only while something waits: an idle socket holds no queue and no task
(every byte per idle socket counts at 10,000 sockets a process). The queue is bounded in frames
and in characters: a client that stops reading is cut off with 4008 (it will `resume` when it
reconnects) instead of holding memory that would slow every other socket of the process.

A close code can be queued behind the frames (`close_after`, e.g. a drain's `reconnect` then
4012) or in place of them (`close_now`, e.g. 4008: the client is not reading, so nothing more
is worth sending, and the close must not wait behind a write blocked on that client).

The socket side is a `Sink` (the consumer, `chat.consumers`): it writes one frame, closes with a
code, decides what a failed write means, and is told when the outbox is written out (so that it
can let it go). One reference, not four bound methods: an outbox is made per burst of frames.
`tests/test_outbox.py` tests it without a socket.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from chat import metrics


class Sink(Protocol):
    async def write_frame(self, text: str) -> None: ...
    async def close_with(self, code: int) -> None: ...
    async def write_failed(self, exc: Exception) -> None: ...
    def outbox_idle(self, outbox: Outbox) -> None: ...


class Outbox:
    __slots__ = ("chars", "close_code", "closed", "frames", "max_chars", "max_frames", "sink", "writer")

    def __init__(self, sink: Sink, max_frames: int, max_chars: int) -> None:
        self.sink = sink
        self.max_frames = max_frames
        self.max_chars = max_chars
        self.frames: deque[str] = deque()
        self.chars = 0
        self.close_code: int | None = None
        self.closed = False  # a close was queued: nothing more is taken
        self.writer: asyncio.Task[None] | None = None

    def put(self, text: str) -> bool:
        """Queue a frame; False (and nothing queued) when the bound would be passed."""
        if self.closed:
            return True  # closing anyway: the frame is dropped, the caller has nothing to do
        if len(self.frames) >= self.max_frames or self.chars + len(text) > self.max_chars:
            return False
        self.frames.append(text)
        self.chars += len(text)
        self._wake()
        return True

    def close_after(self, code: int) -> None:
        """Write what is queued, then close with `code`."""
        if not self.closed:
            self.closed = True
            self.close_code = code
            self._wake()

    def close_now(self, code: int) -> None:
        """Drop what is queued and close with `code`, without waiting for a write in progress
        (it may be blocked on the very client being cut off)."""
        if self.closed:
            return
        self.frames.clear()
        self.chars = 0
        self.cancel()
        self.closed = True
        self.close_code = code
        self._wake()

    def backlog(self) -> int:
        return len(self.frames)

    def cancel(self) -> None:
        if self.writer is not None:
            self.writer.cancel()
            self.writer = None

    def _wake(self) -> None:
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        me = asyncio.current_task()
        try:
            while self.frames:
                text = self.frames.popleft()
                self.chars -= len(text)
                try:
                    await self.sink.write_frame(text)
                except Exception as exc:
                    self.frames.clear()
                    self.chars = 0
                    self.closed = True
                    self.close_code = None
                    await self.sink.write_failed(exc)
                    return
                metrics.DELIVERIES.inc()
            if self.close_code is not None:
                code, self.close_code = self.close_code, None
                await self.sink.close_with(code)
        finally:
            if self.writer is me:
                self.writer = None
                if not self.frames and self.close_code is None:
                    self.sink.outbox_idle(self)  # written out: let it go (idle sockets hold none)
