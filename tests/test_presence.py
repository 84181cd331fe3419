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
            frames.append((room, frame["user"]["username"], frame["status"]))

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
