"""chat.presence across processes: arrivals announced when new, departures after a grace period
unless the user is back (here or on another process). Two `PresenceBook`s stand for two
protocol processes sharing the real Redis of the test run; what they would publish is recorded."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from chat import fanout, presence
from chat.presence import PresenceBook

GRACE = 0.3


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, str]]:
    """(room, user name, status) of every presence frame the books publish."""
    import json

    monkeypatch.setattr(presence, "CONFIG", dataclasses.replace(presence.CONFIG, presence_grace_seconds=GRACE))
    frames: list[tuple[int, str, str]] = []

    async def publish_many(items: Any) -> None:
        for room, _seq, text in items:
            frame = json.loads(text)
            frames.extend((room, user["username"], frame["status"]) for user in frame["users"])

    monkeypatch.setattr(fanout, "publish_many", publish_many)
    return frames


async def arrive(book: PresenceBook, room: int, user: int, name: str) -> list[int]:
    assert book.arrive(room, user, name)
    return await book.mark_online_many([room], user, name)


async def leave(book: PresenceBook, room: int, user: int, name: str) -> None:
    assert book.depart(room, user)
    book.leave_later(room, user, name, announce=True)


async def settled(*books: PresenceBook) -> None:
    await asyncio.sleep(GRACE)
    for book in books:
        if book.sweeper is not None:
            await asyncio.wait_for(book.sweeper, 5)
    await announced(*books)


async def announced(*books: PresenceBook) -> None:
    """Every change the books gathered has been published."""
    for book in books:
        if book.news.flusher is not None:
            await asyncio.wait_for(book.news.flusher, 5)


async def test_a_departure_is_announced_after_the_grace_period_and_the_user_is_gone(published):
    book = PresenceBook()
    assert await arrive(book, 7, 1, "bob") == [7]  # news: announce it
    await leave(book, 7, 1, "bob")
    assert published == []  # not yet
    await settled(book)
    assert published == [(7, "bob", "offline")]
    assert (await PresenceBook().online(7)).count == 0


async def test_back_on_the_same_process_within_the_grace_period_nothing_is_announced(published):
    book = PresenceBook()
    await arrive(book, 7, 1, "bob")
    await leave(book, 7, 1, "bob")
    assert await arrive(book, 7, 1, "bob") == []  # the room still knows bob: no news
    await settled(book)
    assert published == []
    assert [u["username"] for u in (await PresenceBook().online(7)).users] == ["bob"]


async def test_back_on_another_process_within_the_grace_period_nothing_is_announced(published):
    drained, other = PresenceBook(), PresenceBook()
    await arrive(drained, 7, 1, "bob")
    await leave(drained, 7, 1, "bob")
    await asyncio.sleep(0.01)
    assert await arrive(other, 7, 1, "bob") == []
    await settled(drained, other)
    assert published == []
    assert [u["username"] for u in (await PresenceBook().online(7)).users] == ["bob"]


async def test_a_crowded_rooms_departure_leaves_the_set_unannounced(published):
    book = PresenceBook()
    await arrive(book, 7, 1, "bob")
    assert book.depart(7, 1)
    book.leave_later(7, 1, "bob", announce=False)
    await settled(book)
    assert published == []
    assert (await PresenceBook().online(7)).count == 0


@pytest.fixture
def frames(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every presence frame the books publish, whole; a 0.2 s batching window."""
    import json

    monkeypatch.setattr(presence, "CONFIG", dataclasses.replace(
        presence.CONFIG, presence_grace_seconds=GRACE, presence_batch_seconds=0.2))
    published: list[dict[str, Any]] = []

    async def publish_many(items: Any) -> None:
        published.extend(json.loads(text) | {"published_room": room} for room, _seq, text in items)

    monkeypatch.setattr(fanout, "publish_many", publish_many)
    return published


async def test_arrivals_within_the_window_are_one_frame_per_room_listing_them_all(frames):
    # A room's members coming online together (a join storm): each member gets one frame, not one
    # per arrival.
    book = PresenceBook()
    for user, name in ((3, "carol"), (1, "alice"), (2, "bob")):
        assert await arrive(book, 7, user, name) == [7]
        book.announce_online([7], user, name)
    assert await arrive(book, 8, 1, "alice") == [8]
    book.announce_online([8], 1, "alice")
    assert frames == []  # gathered, not yet sent
    await announced(book)
    by_room = {frame["room"]: frame for frame in frames}
    assert len(frames) == 2 and all(frame["published_room"] == frame["room"] for frame in frames)
    assert by_room[7]["status"] == "online"
    assert by_room[7]["users"] == [{"id": 1, "username": "alice"}, {"id": 2, "username": "bob"},
                                   {"id": 3, "username": "carol"}]
    assert by_room[8]["users"] == [{"id": 1, "username": "alice"}]


async def test_gone_and_back_within_one_window_is_announced_once_with_the_status_that_holds(frames):
    book = PresenceBook()
    await arrive(book, 7, 1, "bob")
    await arrive(book, 7, 2, "dan")
    await leave(book, 7, 1, "bob")
    await leave(book, 7, 2, "dan")
    await asyncio.sleep(GRACE)
    await asyncio.wait_for(book.sweeper, 5)  # both settled: offline, waiting in the window
    assert frames == []
    assert await arrive(book, 7, 1, "bob") == [7]  # bob is back (news again: he was removed)
    book.announce_online([7], 1, "bob")
    await announced(book)
    statuses = {user["username"]: frame["status"] for frame in frames for user in frame["users"]}
    assert statuses == {"bob": "online", "dan": "offline"}
    assert len(frames) == 2  # one frame per status


async def test_changes_after_a_window_was_published_go_out_in_the_next(frames):
    book = PresenceBook()
    book.news.add(7, 1, "alice", "online")
    await announced(book)
    book.news.add(7, 2, "bob", "online")
    await announced(book)
    assert [[user["username"] for user in frame["users"]] for frame in frames] == [["alice"], ["bob"]]


async def test_the_heartbeat_refreshes_every_local_entry_in_a_few_round_trips(monkeypatch):
    # 1,200 rooms on this process: three pipelines (of at most 500 rooms), not 1,200 round trips,
    # and every room's entry gets its new expiry; an entry another process let expire is pruned.
    import time as clock

    from chat.contract import presence_key
    from chat.redis_pool import client_for

    book = PresenceBook()
    for room in range(1, 1201):
        book.arrive(room, 7, "ann")
    stale = client_for(presence.room_topic(5))
    await stale.zadd(presence_key(5), {"9:gone": clock.time() - 1})
    pipelines = []
    real_pipeline = type(stale).pipeline

    def counting(self, *args, **kwargs):
        pipelines.append(1)
        return real_pipeline(self, *args, **kwargs)

    monkeypatch.setattr(type(stale), "pipeline", counting)
    before = clock.time()
    await book.beat()
    assert len(pipelines) == 3
    for room in (1, 500, 501, 1200):
        score = await stale.zscore(presence_key(room), "7:ann")
        assert score is not None and score >= before + presence.CONFIG.heartbeat_ttl - 1
    assert await stale.zscore(presence_key(5), "9:gone") is None
