"""Many concurrent lookups answered by one statement per batch (`Coalescer`).

A protocol process under a connect or resume storm asks the database the same kind of question
for hundreds of sockets at once: whose token is this, may this user join that room, what is
this room's last seq. Asked one socket at a time, a join cost ~400 µs of the process's CPU in
the driver; asked 50 together, 62 µs each (docs/benchmarks.md, issue 11's run). Batches form
by themselves: the first question goes out at once, and the questions that arrive while
`lanes` batches are out wait for the next one. A trickle costs no latency, a storm costs one
statement per batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# A key the fetch did not answer (no such row) gets this.
MISSING = None


class Coalescer(Generic[K, V]):
    """`fetch(keys) -> {key: value}` for batches of at most `max_batch` distinct keys, at most
    `lanes` batches at once; a key asked twice while waiting is fetched once."""

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], lanes: int, max_batch: int) -> None:
        self.fetch = fetch
        self.lanes = lanes
        self.max_batch = max_batch
        self.busy = 0
        self.waiting: dict[K, asyncio.Future[V | None]] = {}
        self.batches = 0  # for tests and metrics: statements this coalescer has sent

    async def get(self, key: K) -> V | None:
        future = self._future(key)
        self._start()
        # Shielded: a waiter that is cancelled (its socket closed) must not cancel the answer
        # that other sockets asking the same key are waiting for.
        return await asyncio.shield(future)

    async def get_many(self, keys: Iterable[K]) -> dict[K, V | None]:
        # All keys queued before any batch starts: one caller's keys go out together.
        futures = {key: self._future(key) for key in keys}
        self._start()
        if futures:
            await asyncio.wait(futures.values())
        return {key: future.result() for key, future in futures.items()}

    def _future(self, key: K) -> asyncio.Future[V | None]:
        future = self.waiting.get(key)
        if future is None:
            future = self.waiting[key] = asyncio.get_running_loop().create_future()
        return future

    def _start(self) -> None:
        while self.waiting and self.busy < self.lanes:
            keys = list(self.waiting)[: self.max_batch]
            batch = {key: self.waiting.pop(key) for key in keys}
            self.busy += 1
            self.batches += 1
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: dict[K, asyncio.Future[V | None]]) -> None:
        try:
            found = await self.fetch(list(batch))
        except Exception as exc:
            # Every waiter of the batch learns why; none is left hanging.
            for future in batch.values():
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # a waiter that went away need not have read it: no log
        except BaseException:
            for future in batch.values():
                future.cancel()
            raise
        else:
            for key, future in batch.items():
                if not future.done():
                    future.set_result(found.get(key, MISSING))
        finally:
            self.busy -= 1
            self._start()
