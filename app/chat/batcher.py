"""Persist requests into batches in flight: several at once, each room in at most one of them.

A worker stores a batch on one of its stores (a database connection each, `chat.store_pg`; or
the single ORM path). While a batch is being stored the next one is already going out on
another store, so the database's round trips overlap instead of adding up. Two rules keep the
promise of order:

- a room is in at most one batch in flight: its next messages wait until that batch is stored,
  published and acked, then go in the next batch, in the order they arrived. Seqs therefore
  follow arrival into this worker, and a sender's acks come in the order it sent (another
  worker storing the same room at the same moment can still commit first);
- at a trickle there is one batch in flight with everything that is waiting, so a quiet worker
  pays for one batch per receive, not one per store. A backlog is split over the idle stores by
  room, so a batch that touches every room does not leave the other stores idle behind it.

Backpressure: `add_many` returns only once fewer than a batch's worth of requests wait for a
store. The worker then stops pulling from Redis, so the queue depth the operator measures is
the work really waiting (and another worker can take it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

S = TypeVar("S")
Item = dict[str, Any]


def room_of(item: Item) -> Any:
    """The ordering key of a request; every malformed one shares None (it is dropped later)."""
    room = item.get("room")
    return room if isinstance(room, int) else None


class Batcher(Generic[S]):
    def __init__(
        self,
        stores: list[S],
        run: Callable[[list[Item], S], Awaitable[None]],
        batch_max: int,
        closers: list[Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        if not stores:
            raise ValueError("a batcher needs at least one store")
        self.idle = list(stores)
        self.run = run
        self.batch_max = batch_max
        # A backlog of at least this many is split over several stores; below it, one batch
        # (each batch costs the same few statements and round trips whatever its size).
        self.split_at = max(1, batch_max // len(stores))
        self.closers = closers or []
        self.pending: list[Item] = []
        # Rooms with a batch in flight.
        self.busy: set[Any] = set()
        self.in_flight: set[asyncio.Task[None]] = set()
        self.room_for_more = asyncio.Event()
        self.room_for_more.set()

    async def add(self, item: Item) -> None:
        await self.add_many([item])

    async def add_many(self, items: list[Item]) -> None:
        self.pending.extend(items)
        self._dispatch()
        while len(self.pending) >= self.batch_max:
            self.room_for_more.clear()
            await self.room_for_more.wait()

    def _dispatch(self) -> None:
        while self.idle and self.pending:
            eligible = sum(1 for item in self.pending if room_of(item) not in self.busy)
            if not eligible:
                break  # everything waiting belongs to rooms in flight
            # A trickle goes out as one batch; a backlog is split over the idle stores by room
            # (all of a room's messages in one part), each part at most a batch.
            parts = min(len(self.idle), -(-eligible // self.split_at))
            batches: list[list[Item]] = [[] for _ in range(parts)]
            rooms: list[set[Any]] = [set() for _ in range(parts)]
            held: list[Item] = []
            # A room with a message held must have its later messages held too (order).
            spilled: set[Any] = set()
            for item in self.pending:
                room = room_of(item)
                part = (room or 0) % parts
                if room in self.busy or room in spilled or len(batches[part]) >= self.batch_max:
                    held.append(item)
                    spilled.add(room)
                    continue
                batches[part].append(item)
                rooms[part].add(room)
            self.pending = held
            for batch, its_rooms in zip(batches, rooms, strict=True):
                if not batch:
                    continue
                self.busy |= its_rooms
                task = asyncio.get_running_loop().create_task(self._store(self.idle.pop(), batch, its_rooms))
                self.in_flight.add(task)
        if len(self.pending) < self.batch_max:
            self.room_for_more.set()

    async def _store(self, store: S, batch: list[Item], rooms: set[Any]) -> None:
        try:
            await self.run(batch, store)
        except Exception:
            # Stored but perhaps not published or acked (Redis gone mid-way): the senders retry,
            # and a retry of a stored message is published and acked as a duplicate.
            log.exception("a batch of %d messages failed after storing began", len(batch))
        finally:
            self.busy -= rooms
            self.idle.append(store)
            task = asyncio.current_task()
            if task is not None:
                self.in_flight.discard(task)  # type: ignore[arg-type]
            self._dispatch()

    async def flush(self) -> None:
        """Return once everything added has been stored (or has failed)."""
        while self.in_flight or self.pending:
            self._dispatch()
            if self.in_flight:
                await asyncio.wait(list(self.in_flight))

    async def close(self) -> None:
        for close in self.closers:
            await close()
