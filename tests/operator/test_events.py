"""Repeated Events are folded, as client-go's EventCorrelator folds them, not reposted."""

from __future__ import annotations

from parley_operator.events import EventLimiter

KEY = ("uid-chat", "Warning", "DriftReverted")


def test_an_event_repeated_every_poll_is_posted_once_per_window() -> None:
    limiter = EventLimiter(window=600)
    # One poll every 15 s for an hour: 240 identical Events.
    posted = [m for t in range(0, 3600, 15) if (m := limiter.admit(KEY, "protocol template edited", t))]
    assert len(posted) == 6  # one per 10-minute window, not 240
    assert posted[0] == "protocol template edited"
    # The next window's Event says how many were folded into the previous one.
    assert posted[1] == "protocol template edited (39 similar Event(s) before this one were not posted)"


def test_similar_events_are_posted_up_to_a_limit_then_folded() -> None:
    limiter = EventLimiter(window=600, max_similar=10)
    posted = [limiter.admit(("uid-chat", "Normal", "ScaledUp"), f"{n} -> {n + 1}", n) for n in range(15)]
    assert posted[:10] == [f"{n} -> {n + 1}" for n in range(10)]
    assert posted[10:] == [None] * 5


def test_other_objects_and_reasons_are_not_folded_together() -> None:
    limiter = EventLimiter(window=600)
    assert limiter.admit(KEY, "m", 0) == "m"
    assert limiter.admit(("uid-other", "Warning", "DriftReverted"), "m", 1) == "m"
    assert limiter.admit(("uid-chat", "Warning", "ConvergeFailed"), "m", 2) == "m"
    assert limiter.admit(KEY, "m", 3) is None


def test_memory_is_bounded_by_the_objects_of_the_last_windows() -> None:
    limiter = EventLimiter(window=600)
    for n in range(1000):
        limiter.admit((f"uid-{n}", "Normal", "ScaledUp"), "m", n)
    limiter.admit(KEY, "m", 5000)
    assert len(limiter._windows) == 1
