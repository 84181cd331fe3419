"""chat.batcher: batches in flight at once, a room in at most one, order kept, bounded backlog.

No database and no Redis: the stores are coroutines that record what they were given.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chat.batcher import Batcher


class Recorder:
    """Stores that take `delay` seconds a batch and remember every batch and the overlap."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.batches: list[tuple[str, list[int]]] = []
        self.active = 0
        self.most_active = 0
        self.rooms_in_flight: set[int] = set()
        self.overlapping_room = False

    async def run(self, batch: list[dict[str, Any]], store: str) -> None:
        rooms = {item["room"] for item in batch}
        self.overlapping_room |= bool(rooms & self.rooms_in_flight)
        self.rooms_in_flight |= rooms
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        await asyncio.sleep(self.delay)
        self.batches.append((store, [item["n"] for item in batch]))
        self.active -= 1
        self.rooms_in_flight -= rooms


def items(rooms: list[int], start: int = 0) -> list[dict[str, Any]]:
    return [{"room": room, "n": start + n} for n, room in enumerate(rooms)]


async def test_a_trickle_is_stored_as_one_batch_on_one_store():
    recorder = Recorder()
    batcher = Batcher(["a", "b", "c", "d"], recorder.run, batch_max=200)
    await batcher.add_many(items([1, 2, 3, 4, 5]))
    await batcher.flush()
    assert [n for _, n in recorder.batches] == [[0, 1, 2, 3, 4]]


async def test_while_a_batch_is_stored_the_next_goes_out_on_another_store():
    recorder = Recorder(delay=0.05)
    batcher = Batcher(["a", "b"], recorder.run, batch_max=200)
    await batcher.add_many(items([1, 2]))
    await batcher.add_many(items([3, 4], start=2))  # other rooms: no need to wait
    await batcher.flush()
    assert recorder.most_active == 2
    assert sorted(n for _, n in recorder.batches) == [[0, 1], [2, 3]]
    assert {store for store, _ in recorder.batches} == {"a", "b"}


async def test_a_room_is_never_in_two_batches_at_once_and_keeps_its_order():
    recorder = Recorder(delay=0.01)
    batcher = Batcher(["a", "b", "c", "d"], recorder.run, batch_max=7)
    rooms = [n % 5 for n in range(300)]  # 5 rooms, interleaved
    for start in range(0, 300, 13):
        await batcher.add_many(items(rooms[start:start + 13], start=start))
    await batcher.flush()
    assert not recorder.overlapping_room
    assert recorder.most_active > 1
    stored = [n for _, batch in recorder.batches for n in batch]
    assert sorted(stored) == list(range(300))  # each once
    for room in range(5):
        in_order = [n for n in stored if rooms[n] == room]
        assert in_order == sorted(in_order), f"room {room} reordered"


async def test_the_caller_is_held_while_a_batchs_worth_waits_for_a_store():
    release = asyncio.Event()

    async def slow(batch: list[dict[str, Any]], store: str) -> None:
        await release.wait()

    batcher = Batcher(["only"], slow, batch_max=10)
    await batcher.add_many(items(list(range(10))))  # all in flight: the caller goes on
    adding = asyncio.ensure_future(batcher.add_many(items(list(range(10, 20)))))
    await asyncio.sleep(0.05)
    assert not adding.done(), "a full batch's worth waits and the store is busy: the caller must wait"
    assert len(batcher.pending) == 10
    release.set()
    await asyncio.wait_for(adding, 1)
    await batcher.flush()
    assert batcher.pending == [] and not batcher.in_flight


async def test_a_failing_batch_frees_its_rooms_and_store():
    calls: list[list[int]] = []

    async def fails_once(batch: list[dict[str, Any]], store: str) -> None:
        calls.append([item["n"] for item in batch])
        if len(calls) == 1:
            raise RuntimeError("Redis went away after the commit")

    batcher = Batcher(["only"], fails_once, batch_max=10)
    await batcher.add_many(items([1, 1]))
    await batcher.flush()
    await batcher.add_many(items([1], start=2))
    await batcher.flush()
    assert calls == [[0, 1], [2]]


async def test_a_backlog_over_every_room_is_split_over_the_idle_stores():
    recorder = Recorder(delay=0.05)
    batcher = Batcher(["a", "b", "c", "d"], recorder.run, batch_max=200)
    await batcher.add_many(items(list(range(1, 201))))  # one message in each of 200 rooms
    await batcher.flush()
    assert recorder.most_active == 4
    assert sorted(len(batch) for _, batch in recorder.batches) == [50, 50, 50, 50]
