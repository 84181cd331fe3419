"""The offline simulation: the default profile through the rule the operator uses."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from parley_operator import scaling, simulate


def test_simulation_writes_a_plot_and_the_windows_pay_off(tmp_path: Path, capsys) -> None:
    out = tmp_path / "autoscaling.png"
    result = simulate.main(["--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["messages_expired"] == 0  # no message outlives the channel expiry
    assert result["minutes_at_zero"] > 10  # the quiet tail runs with no workers at all
    assert result["max_replicas"] == 40  # the spike hits maxReplicas, and no more
    printed = capsys.readouterr().out
    assert "no windows" in printed and "plot:" in printed


def test_without_windows_the_same_rule_flaps_and_loses_messages() -> None:
    model = simulate.Model(duration=2400)
    rate = simulate.profile_rate(simulate.DEFAULT_PROFILE)
    policy = scaling.Policy(min_replicas=0, max_replicas=40, target=100, down_window=300,
                            max_step_up=10, max_step_down=2)
    bare = scaling.Policy(min_replicas=0, max_replicas=40, target=100, down_window=0,
                          max_step_up=1000, max_step_down=1000)
    steady, flappy = simulate.simulate(policy, model, rate), simulate.simulate(bare, model, rate)
    assert flappy.scale_events > 2 * steady.scale_events
    assert flappy.expired > 0
    assert steady.expired == 0


def test_profile_interpolates_between_phases() -> None:
    rate = simulate.profile_rate([simulate.Phase(10, 0), simulate.Phase(20, 100), simulate.Phase(30, 100)])
    assert (rate(0), rate(15), rate(25), rate(99)) == (0, 50, 100, 100)


def test_the_edges_profile_holds_replicas_through_a_restart_and_a_shard_outage(tmp_path: Path) -> None:
    out = tmp_path / "edges.png"
    result = simulate.main(["--profile", "edges", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["messages_expired"] == 0

    policy = scaling.Policy(min_replicas=0, max_replicas=40, target=100, down_window=300,
                            max_step_up=10, max_step_down=2)
    model = simulate.Model(duration=simulate.EDGES_PROFILE[-1].until)
    rate = simulate.profile_rate(simulate.EDGES_PROFILE)
    edges = simulate.EDGES
    now, before = simulate.simulate(policy, model, rate, disruptions=edges), simulate.simulate(
        policy, model, rate, disruptions=dataclasses.replace(edges, survives=False))

    restart = int(edges.restarts[0])
    # The restarted operator holds what it had for the next two minutes; the one that forgot
    # its history starts removing workers at its first poll.
    assert set(now.desired[restart - 1:restart + 120]) == {now.desired[restart - 1]}
    assert min(before.desired[restart:restart + 30]) < before.desired[restart - 1]

    start, end = (int(x) for x in edges.outages[0])
    # One shard down while the load doubles: a lower bound never scales down, and still scales up.
    during = now.desired[start:end]
    assert all(b >= a for a, b in itertools.pairwise(during))
    assert max(during) > now.desired[start]
    assert set(before.desired[start:end]) == {before.desired[start]}  # blind: frozen
    assert before.expired > 0


def test_waking_from_zero_takes_at_most_one_poll_and_the_start_up() -> None:
    """The worst case of a message sent while workers sleep at zero (docs/autoscaling.md)."""
    policy = scaling.Policy(min_replicas=0, max_replicas=10, target=100, down_window=300)
    model = simulate.Model(duration=700)
    waits = {}
    for offset in range(int(model.poll_seconds)):
        at = 600.0 + offset  # 600 s is a poll; the operator has seen only an empty queue
        trace = simulate.simulate(policy, model, lambda t, at=at: 50.0 if t == at else 0.0)
        assert trace.expired == 0
        waits[offset] = max(trace.latency)
    # Sent just after a poll: waits for the next poll, then a worker's start-up (1 s ticks).
    assert max(waits.values()) == waits[1] == model.poll_seconds + model.startup_seconds == 35
    assert waits[0] == model.startup_seconds + 1  # sent as a poll reads: the start-up alone
    assert max(waits.values()) < model.expiry_seconds
