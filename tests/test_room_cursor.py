"""chat.room_cursor: every seq of a room reaches a connection once and in order, whatever the
order live frames and catch-ups arrive in. No socket, no Redis, no database.

`Replay` plays the consumer's part: it pushes what the cursor says to send, and when the cursor
asks for a catch-up it serves the missing frames from a "database" of the room's messages.
"""

from __future__ import annotations

import json
import random

import pytest

from chat.room_cursor import Cursor, Offer


def frame(seq: int) -> dict:
    return {"type": "message", "seq": seq, "body": f"m{seq}"}


def text(seq: int) -> str:
    return json.dumps(frame(seq))


class Replay:
    def __init__(self, stored: int, last_seq: int = 0) -> None:
        self.stored = stored  # seqs 1..stored are in the database
        self.cursor = Cursor(last_seq=last_seq)
        self.sent: list[int] = []
        self.fills = 0
        self.fill_needed = True  # a new cursor starts with a catch-up (join or resume)

    def live(self, seq: int | None) -> Offer:
        offer = self.cursor.offer(seq, text(seq) if seq else '{"type":"typing"}')
        if offer is Offer.SEND and seq is not None:
            self.sent.append(seq)
        if offer is Offer.FILL:
            self.fill_needed = True
        return offer

    def run_fill(self) -> None:
        assert self.fill_needed and self.cursor.filling
        self.fills += 1
        self.fill_needed = False
        missing = [frame(s) for s in range(self.cursor.last_seq + 1, self.stored + 1)]
        self.sent += [f["seq"] for f in self.cursor.catch_up(missing)]
        for seq, _ in self.cursor.release():
            self.live(seq)


def test_live_frames_in_order_go_out_one_by_one():
    replay = Replay(stored=0)
    replay.run_fill()
    for seq in (1, 2, 3):
        replay.stored = seq
        assert replay.live(seq) is Offer.SEND
    assert replay.sent == [1, 2, 3] and replay.fills == 1


def test_a_duplicate_publish_is_dropped():
    replay = Replay(stored=2)
    replay.run_fill()
    assert replay.live(2) is Offer.DROP
    assert replay.sent == [1, 2]


def test_a_gap_holds_the_frame_and_asks_for_a_catch_up_that_fills_it():
    replay = Replay(stored=1)
    replay.run_fill()
    replay.stored = 4  # 2 and 3 were published while the subscription was down
    assert replay.live(4) is Offer.FILL
    assert replay.live(5) is Offer.HOLD  # arrives during the catch-up
    replay.stored = 5
    replay.run_fill()
    assert replay.sent == [1, 2, 3, 4, 5]


def test_frames_arriving_during_the_first_catch_up_wait_for_it():
    replay = Replay(stored=3)
    assert replay.live(4) is Offer.HOLD
    replay.stored = 4
    replay.run_fill()
    assert replay.sent == [1, 2, 3, 4]


def test_ephemeral_frames_go_out_only_once_the_room_is_open():
    cursor = Cursor()
    assert cursor.offer(None, '{"type":"typing"}') is Offer.DROP
    cursor.open = True
    assert cursor.offer(None, '{"type":"typing"}') is Offer.SEND


def test_a_resume_rewinds_only_when_no_catch_up_is_running():
    cursor = Cursor(last_seq=10, filling=False)
    assert cursor.rewind(4) and cursor.last_seq == 4 and cursor.filling
    assert not cursor.rewind(2), "a catch-up is running: it delivers from 4 anyway"
    assert cursor.last_seq == 4


def test_too_far_behind_skips_and_keeps_only_newer_held_frames():
    cursor = Cursor(last_seq=1)
    for seq in (700, 900, 1001, 1002):
        cursor.offer(seq, text(seq))
    cursor.skip_to(1000)
    assert [seq for seq, _ in cursor.release()] == [1001, 1002]


@pytest.mark.parametrize("seed", range(20))
def test_any_interleaving_of_live_frames_and_losses_delivers_every_seq_once_in_order(seed):
    rng = random.Random(seed)
    total = 60
    replay = Replay(stored=0)
    published = 0
    in_flight: list[int] = []  # published, not yet arrived (pub/sub may reorder across a reconnect)
    while published < total or in_flight:
        if published < total and rng.random() < 0.6:
            published += 1
            replay.stored = published
            if rng.random() < 0.15:
                continue  # lost by pub/sub: only a catch-up brings it
            in_flight.append(published)
        elif in_flight:
            seq = in_flight.pop(rng.randrange(len(in_flight)) if rng.random() < 0.2 else 0)
            replay.live(seq)
        if replay.fill_needed and rng.random() < 0.5:
            replay.run_fill()
        if rng.random() < 0.05:
            replay.live(None)  # typing: never part of the sequence
    while replay.fill_needed:
        replay.run_fill()
    # A lost last message is only found by the next catch-up (a reconnect or the next gap).
    if replay.cursor.last_seq < total:
        replay.cursor.rewind(replay.cursor.last_seq)
        replay.fill_needed = True
        replay.run_fill()
    assert replay.sent == list(range(1, total + 1))


def test_held_frames_go_out_in_seq_order_without_another_catch_up():
    replay = Replay(stored=4)
    assert replay.live(6) is Offer.HOLD
    assert replay.live(5) is Offer.HOLD  # arrived out of order (another shard's reconnect)
    replay.run_fill()  # the database has 1..4
    assert replay.sent == [1, 2, 3, 4, 5, 6]
    assert not replay.fill_needed and replay.fills == 1
