"""Table-driven tests of the pure scaling rule.

Each case replays samples `(seconds, load)` through `decide`, applying every decision as the
operator would (the Deployment then has the decided replicas), and lists the replica count
after each sample.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from parley_operator.scaling import Policy, Reason, decide, raw_recommendation

BASE = Policy(min_replicas=1, max_replicas=20, target=100, tolerance=0.1, up_window=0, down_window=60,
              max_step_up=10, max_step_down=10, metric="queue depth")


def replay(policy: Policy, start: int, samples: list[tuple[float, float | None]]) -> tuple[list[int], list[Reason]]:
    current, history = start, ()
    replicas, reasons = [], []
    for at, load in samples:
        decision = decide(policy, current, load, at, history)
        current, history = decision.replicas, decision.history
        replicas.append(current)
        reasons.append(decision.reason)
    return replicas, reasons


CASES = [
    # name, policy changes, start replicas, samples, expected replicas after each sample
    ("scale up on backlog at once (no up window)", {}, 1,
     [(0, 450)], [5]),
    ("no flapping inside the tolerance band", {}, 4,
     [(0, 430), (15, 370), (30, 440), (45, 361)], [4, 4, 4, 4]),
    ("just outside the band moves", {}, 4,
     [(0, 450)], [5]),
    ("scale-down waits for the whole window", {}, 6,
     [(0, 600), (15, 100), (30, 100), (45, 100), (60, 100), (75, 100)], [6, 6, 6, 6, 6, 1]),
    ("a single quiet sample inside a busy window does not scale down", {}, 6,
     [(0, 600), (15, 0), (30, 600), (45, 0), (60, 600)], [6, 6, 6, 6, 6]),
    ("scale-down goes to the highest recommendation of the window", {}, 8,
     [(0, 800), (20, 500), (40, 300), (61, 300), (81, 300), (101, 300)], [8, 8, 8, 5, 3, 3]),
    ("scale-up window needs a sustained backlog", {"up_window": 30}, 2,
     [(0, 200), (10, 900), (20, 900), (30, 900), (41, 900)], [2, 2, 2, 2, 9]),
    ("scale-up window ignores a single spike", {"up_window": 30}, 2,
     [(0, 200), (10, 2000), (20, 200), (30, 200), (45, 200)], [2, 2, 2, 2, 2]),
    ("step limit up", {"max_step_up": 2}, 1,
     [(0, 1000), (15, 1000), (30, 1000), (45, 1000), (60, 1000)], [3, 5, 7, 9, 10]),
    ("step limit down", {"max_step_down": 1, "down_window": 0}, 5,
     [(0, 0), (15, 0), (30, 0), (45, 0), (60, 0)], [4, 3, 2, 1, 1]),
    ("max replicas caps a flood", {"max_replicas": 6}, 2,
     [(0, 100_000)], [6]),
    ("min replicas floors an idle system", {"min_replicas": 3, "down_window": 0}, 5,
     [(0, 0)], [3]),
    ("raising minReplicas applies at once, beyond the step limit", {"min_replicas": 8, "max_step_up": 1}, 2,
     [(0, 0)], [8]),
    ("workers scale to zero after the window, and back when work arrives",
     {"min_replicas": 0, "down_window": 30}, 2,
     [(0, 150), (15, 0), (30, 0), (46, 0), (60, 0), (75, 1), (90, 350)], [2, 2, 2, 0, 0, 1, 4]),
    ("from zero a single message wakes one worker, tolerance notwithstanding",
     {"min_replicas": 0, "tolerance": 0.9}, 0,
     [(0, 1)], [1]),
    ("missing metrics hold the current count", {"down_window": 0}, 7,
     [(0, None), (15, None), (30, None)], [7, 7, 7]),
    ("missing metrics never scale to zero", {"min_replicas": 0, "down_window": 0}, 3,
     [(0, None), (100, None)], [3, 3]),
    ("missing metrics still honour a lowered maxReplicas", {"max_replicas": 4}, 7,
     [(0, None)], [4]),
    ("recovery after an outage resumes from the held count", {"down_window": 30}, 5,
     [(0, 500), (15, None), (30, None), (45, 100), (60, 100), (76, 100)], [5, 5, 5, 5, 5, 1]),
]


@pytest.mark.parametrize(("name", "changes", "start", "samples", "expected"), CASES, ids=[c[0] for c in CASES])
def test_scaling_rule(name: str, changes: dict, start: int, samples: list, expected: list[int]) -> None:
    replicas, _ = replay(replace(BASE, **changes), start, samples)
    assert replicas == expected


@pytest.mark.parametrize(("current", "load", "expected"), [
    (4, 400, 4), (4, 439, 4), (4, 441, 5), (4, 361, 4), (4, 359, 4), (4, 300, 3),
    (0, 0, 0), (0, 50, 1), (3, 0, 0), (2, 300.0000001, 3),
])
def test_raw_recommendation(current: int, load: float, expected: int) -> None:
    assert raw_recommendation(BASE, current, load) == expected


@pytest.mark.parametrize(("changes", "start", "samples", "reason"), [
    ({}, 1, [(0, 500)], Reason.SCALE_UP),
    ({"down_window": 0}, 5, [(0, 100)], Reason.SCALE_DOWN),
    ({}, 4, [(0, 400)], Reason.STEADY),
    ({}, 5, [(0, 500), (10, 100)], Reason.DOWN_STABILIZING),
    ({"up_window": 60}, 1, [(0, 100), (10, 900)], Reason.UP_STABILIZING),
    ({"max_replicas": 3}, 3, [(0, 900)], Reason.AT_MAX),
    ({"min_replicas": 2, "down_window": 0}, 2, [(0, 0)], Reason.AT_MIN),
    ({}, 3, [(0, None)], Reason.NO_METRICS),
])
def test_reasons_explain_the_decision(changes: dict, start: int, samples: list, reason: Reason) -> None:
    _, reasons = replay(replace(BASE, **changes), start, samples)
    assert reasons[-1] == reason


def test_message_names_the_metric_and_the_step_limit() -> None:
    decision = decide(replace(BASE, max_step_up=2), 1, 900, 0.0)
    assert decision.message == (
        "queue depth 900 for target 100/replica: 1 -> 3 (step limited to +2, wants 9)")


def test_history_is_pruned_to_the_longest_window() -> None:
    policy = replace(BASE, up_window=10, down_window=30)
    history = ()
    for t in range(0, 300, 5):
        history = decide(policy, 2, 200, float(t), history).history
    assert len(history) <= 30 // 5 + 1


@pytest.mark.parametrize("bad", [
    {"min_replicas": 5, "max_replicas": 4}, {"max_replicas": 0, "min_replicas": 0},
    {"target": 0}, {"max_step_up": 0}, {"max_step_down": 0},
])
def test_policy_rejects_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        replace(BASE, **bad)


# --- issue 14: the edges ------------------------------------------------------------------------

PROTOCOL = Policy(min_replicas=2, max_replicas=20, target=100, down_window=300, max_step_down=2,
                  metric="connections")


def test_an_empty_history_is_seeded_with_the_current_replicas() -> None:
    # A restart during a dip: 400 connections for 10 pods. Without a seed, 10 -> 8 -> 6 -> 4 in 30 s.
    replicas, reasons = replay(PROTOCOL, 10, [(t, 400) for t in range(0, 316, 15)])
    assert replicas[:3] == [10, 10, 10]
    assert reasons[0] == Reason.DOWN_STABILIZING
    # ...and once the window holds a whole window of real samples, it scales down as before.
    assert replicas[-2:] == [10, 8]


def test_the_seed_never_delays_a_scale_up() -> None:
    # The seed (2, the current count) is not a sample: the up window's lowest is the real 9.
    assert decide(replace(PROTOCOL, up_window=60), 2, 900, 0).replicas == 9


@pytest.mark.parametrize(("current", "load", "expected", "reason"), [
    (5, 100, 5, Reason.PARTIAL_METRICS),  # a lower bound of 1 pod's worth: never down
    (2, 900, 9, Reason.SCALE_UP),  # at least 9 pods' worth: up
    (0, 1, 1, Reason.SCALE_UP),  # one message on the readable shards wakes a worker
])
def test_a_partial_reading_scales_up_never_down(current: int, load: float, expected: int, reason: Reason) -> None:
    policy = replace(BASE, min_replicas=0, down_window=0)
    decision = decide(policy, current, load, 0.0, lower_bound=True)
    assert (decision.replicas, decision.reason) == (expected, reason)


@pytest.mark.parametrize(("failures", "current", "expected", "reason"), [
    (1, 2, 2, Reason.NO_METRICS),  # below the threshold: hold
    (3, 2, 6, Reason.FALLBACK),  # at the threshold: up to the fallback
    (3, 9, 9, Reason.NO_METRICS),  # above the fallback: held, never lowered while blind
    (3, 0, 6, Reason.FALLBACK),
])
def test_fallback_after_n_failed_readings(failures: int, current: int, expected: int, reason: Reason) -> None:
    policy = replace(BASE, min_replicas=0, fallback_replicas=6, fallback_after=3)
    decision = decide(policy, current, None, 0.0, failures=failures)
    assert (decision.replicas, decision.reason) == (expected, reason)


@pytest.mark.parametrize(("current", "load", "unmeasured", "expected"), [
    (4, 100, 3, 4),  # 1 reporting at 100, 3 unknown: at target they make 400, no scale-down
    (4, 100, 1, 2),  # 3 reporting, 100 in all, plus 1 at target: 200, so 2 (not 1)
    (4, 900, 3, 9),  # the scale-up estimate counts the unknown at zero, and still goes up
    (4, 0, 0, 1),  # all reporting, all idle: down
])
def test_replicas_without_a_metric_are_assumed_at_target_on_scale_down(
    current: int, load: float, unmeasured: int, expected: int,
) -> None:
    policy = replace(BASE, down_window=0)
    assert decide(policy, current, load, 0.0, unmeasured=unmeasured).replicas == expected


@pytest.mark.parametrize(("current", "load", "expected"), [
    (0, 5, 0), (0, 10, 0), (0, 11, 1),  # asleep: only above the activation threshold
    (2, 5, 1),  # awake: the activation threshold plays no part
])
def test_activation_threshold(current: int, load: float, expected: int) -> None:
    policy = replace(BASE, min_replicas=0, down_window=0, activation=10)
    assert decide(policy, current, load, 0.0).replicas == expected


def test_a_trickle_below_the_activation_threshold_still_wakes_a_worker_in_time() -> None:
    # Below the threshold work would wait for more to come, and expire: not past the bound.
    policy = replace(BASE, min_replicas=0, activation=10, activation_max_wait=30)
    assert decide(policy, 0, 3, 0.0, waited=29).replicas == 0
    assert decide(policy, 0, 3, 0.0, waited=30).replicas == 1


def test_waking_from_zero_skips_the_scale_up_window() -> None:
    policy = replace(BASE, min_replicas=0, up_window=120)
    assert decide(policy, 0, 1, 0.0).replicas == 1  # the first message does not wait 120 s


def test_scale_to_zero_waits_for_the_cooldown() -> None:
    policy = replace(BASE, min_replicas=0, down_window=30, cooldown=120)
    replicas, _ = replay(policy, 2, [(0, 150), (15, 0), (46, 0), (90, 0), (121, 0), (135, 0)])
    assert replicas == [2, 2, 1, 1, 0, 0]  # to 1 after the 30 s window, to 0 after 120 s idle


@pytest.mark.parametrize(("load", "expected"), [(9000, 3), (30000, 6), (50000, 10), (100, 2)])
def test_the_survivors_of_a_drain_stay_under_the_per_pod_ceiling(load: float, expected: int) -> None:
    policy = Policy(min_replicas=1, max_replicas=100, target=5000, ceiling=6000, down_window=0,
                    max_step_up=100, max_step_down=100)
    decision = decide(policy, 1, load, 0.0)
    assert decision.replicas == expected
    assert load / (decision.replicas - 1) <= 6000  # one pod drains: the others take its sockets


def test_compaction_keeps_exactly_what_the_windows_need() -> None:
    import random

    from parley_operator.scaling import Recommendation, compact

    rng = random.Random(14)
    policy = replace(BASE, up_window=45, down_window=120, cooldown=200)
    history: list[Recommendation] = []
    for step in range(400):
        now = step * 15.0
        history.append(Recommendation(now, rng.randint(0, 12)))
        kept = compact(history, policy, now)
        for later in (now, now + 14, now + 60, now + 119):
            for window in (policy.up_window, policy.down_window, policy.cooldown):
                full = [r.replicas for r in history if later - r.at <= window]
                small = [r.replicas for r in kept if later - r.at <= window]
                assert max(full, default=None) == max(small, default=None)
                if window == policy.up_window:
                    assert min(full, default=None) == min(small, default=None)
        assert len(kept) < 40
        history = list(kept)
