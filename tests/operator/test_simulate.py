"""The offline simulation: the default profile through the rule the operator uses."""

from __future__ import annotations

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
