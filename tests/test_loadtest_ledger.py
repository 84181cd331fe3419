"""The load test's checks (loadtest/parley_locust): what each simulated member counts as a gap, a
duplicate, a reordering or a lost message, without a server. The end-to-end run is
tests/test_loadtest_smoke.py. (Locust itself is not imported here: it monkey-patches the process
with gevent, which the rest of the suite must not inherit.)"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loadtest"))

from parley_locust.coordinator import parse_addresses
from parley_locust.ledger import RoomTrack, Totals
from parley_locust.mix import parse_mix, plan_for
from parley_locust.users_file import RoomRef, UserRecord


def test_a_room_received_in_order_counts_every_delivery_and_nothing_else():
    totals, track = Totals(), RoomTrack(base=40)
    for seq in range(41, 51):
        assert track.receive(seq, totals)
    assert (totals.deliveries, totals.gaps, totals.duplicates, totals.reordered) == (10, 0, 0, 0)
    assert track.settle(50, acked_seqs=[45], totals=totals) == 0 and totals.lost == 0


def test_a_skipped_seq_is_a_gap_and_is_lost_unless_the_final_resume_brings_it():
    totals, track = Totals(), RoomTrack(base=0)
    for seq in (1, 2, 4, 5):
        track.receive(seq, totals)
    assert totals.gaps == 1 and track.high == 2
    # The final resume replays from 2: 3 arrives (late), 4 and 5 come again (not duplicates).
    track.final = True
    for seq in (3, 4, 5):
        track.receive(seq, totals)
    assert (totals.late, totals.duplicates, track.high) == (1, 0, 5)
    assert track.settle(5, [], totals) == 0


def test_what_the_server_cannot_give_after_the_final_resume_is_lost():
    totals, track = Totals(), RoomTrack(base=0)
    for seq in (1, 2, 5):
        track.receive(seq, totals)
    # The room's last seq is 6 and 3, 4 and 6 never came; this member's ack said 7: never stored.
    assert track.settle(6, acked_seqs=[2, 7], totals=totals) == 4
    assert totals.lost == 4


def test_duplicates_and_reordering_are_told_apart():
    totals, track = Totals(), RoomTrack(base=0)
    for seq in (1, 3, 2, 3, 1):
        track.receive(seq, totals)
    assert (totals.gaps, totals.reordered, totals.duplicates, totals.deliveries) == (1, 1, 2, 3)


def test_a_senders_message_stored_twice_or_acked_at_another_seq_is_caught():
    totals, track = Totals(), RoomTrack(base=0)
    track.own_message("7.a.1", 1, totals)
    track.own_message("7.a.1", 2, totals)  # the same client_msg_id at a second seq
    track.acked("7.a.1", 3, totals)  # and acked at a third
    assert (totals.stored_twice, totals.mismatched) == (1, 1)


def test_a_reload_skips_what_history_holds_without_counting_it_lost():
    totals, track = Totals(), RoomTrack(base=0)
    track.receive(1, totals)
    track.skip_to(900, totals)
    assert track.settle(900, [], totals) == 0 and totals.reloads == 1


def test_totals_of_several_processes_add_up_counters_and_codes():
    a, b = Totals(acked=3, lost=1), Totals(acked=4)
    a.add_error("busy")
    b.add_error("busy")
    b.add_close(4008)
    total = Totals.summed([a.as_dict(), b.as_dict()])
    assert total["acked"] == 7 and total["lost"] == 1
    assert total["errors"] == {"busy": 2} and total["closes"] == {"4008": 1}


def test_the_mix_is_parsed_into_shares_and_bad_input_is_a_clear_error():
    assert parse_mix("idle=80,group=12,dm=5,bot=3") == pytest.approx(
        {"idle": 0.8, "group": 0.12, "dm": 0.05, "bot": 0.03})
    assert parse_mix("group=1") == {"idle": 0.0, "group": 1.0, "dm": 0.0, "bot": 0.0}
    for bad, says in (("chat=3", "behaviour"), ("idle=x", "not a number"), ("idle=0", "nothing"),
                      ("idle=-1,group=2", "negative")):
        with pytest.raises(ValueError, match=says):
            parse_mix(bad)


def test_a_chatter_talks_in_small_rooms_more_and_one_without_a_bot_room_chats_in_its_groups():
    rooms = (RoomRef(1, "group", 5), RoomRef(2, "group", 1000), RoomRef(3, "dm", 2))
    record = UserRecord(0, 10, "lt0000000", "token", rooms)
    plan = plan_for(record, parse_mix("group=1"), random.Random(1))
    assert plan.behaviour == "group" and [r.id for r in plan.talks_in] == [1, 2]
    assert plan.weights[0] == 200 * plan.weights[1]
    assert plan_for(record, parse_mix("bot=1"), random.Random(1)).behaviour == "group"
    assert [r.id for r in plan_for(record, parse_mix("dm=1"), random.Random(1)).talks_in] == [3]
    alone = UserRecord(1, 11, "lt0000001", "token", (RoomRef(3, "dm", 2),))
    assert plan_for(alone, parse_mix("bot=1"), random.Random(1)).behaviour == "idle"


def test_source_addresses_as_ranges_networks_and_lists():
    assert parse_addresses("") == []
    assert parse_addresses("127.0.0.2-127.0.0.4") == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert parse_addresses("127.0.1.0/30") == ["127.0.1.1", "127.0.1.2"]
    assert parse_addresses("127.0.0.9, 127.0.0.7") == ["127.0.0.9", "127.0.0.7"]
    with pytest.raises(ValueError):
        parse_addresses("127.0.0.9-127.0.0.1")
    with pytest.raises(ValueError):
        parse_addresses("localhost")
