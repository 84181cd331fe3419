"""The spec fields of issue 14's edges: fallback, activation, cooldown, the per-pod ceiling."""

from __future__ import annotations

import jsonschema
import pytest
from op_testkit import admit, chat_platform

from parley_operator.spec import SpecError, parse_body


def test_the_new_fields_reach_the_scaling_policy() -> None:
    body = admit(chat_platform(
        protocol={"targetConnectionsPerPod": 5000, "maxConnectionsPerPod": 9000},
        worker={"minReplicas": 0, "activationQueueDepth": 5, "scaleToZeroCooldownSeconds": 600},
        scaling={"fallback": {"protocolReplicas": 6, "workerReplicas": 2}}))
    spec = parse_body(body)
    protocol, worker = spec.policy("protocol"), spec.policy("worker")
    assert (protocol.ceiling, protocol.fallback_replicas, protocol.fallback_after) == (9000, 6, 3)
    assert (worker.activation, worker.cooldown, worker.fallback_replicas) == (5, 600, 2)
    assert worker.ceiling is None
    assert worker.activation_max_wait == 30  # half the 60 s channel expiry: a trickle still wakes a worker


def test_defaults_change_nothing() -> None:
    spec = parse_body(admit(chat_platform()))
    for role in ("protocol", "worker"):
        policy = spec.policy(role)
        assert (policy.ceiling, policy.activation, policy.cooldown, policy.fallback_replicas) == (None, 0, 0, None)


@pytest.mark.parametrize(("spec", "says"), [
    ({"protocol": {"targetConnectionsPerPod": 5000, "maxConnectionsPerPod": 4000}}, "maxConnectionsPerPod"),
    ({"scaling": {"fallback": {"failureThreshold": 2}}}, "fallback"),
])
def test_inconsistent_edges_are_refused_with_a_message(spec: dict, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        parse_body(chat_platform(**spec))


@pytest.mark.parametrize("spec", [
    {"worker": {"activationQueueDepth": -1}},
    {"worker": {"scaleToZeroCooldownSeconds": -5}},
    {"protocol": {"maxConnectionsPerPod": 0}},
    {"scaling": {"fallback": {"failureThreshold": 0, "workerReplicas": 1}}},
    {"scaling": {"fallback": {"protocolReplicas": 0}}},
])
def test_the_crd_rejects_nonsense(spec: dict) -> None:
    with pytest.raises(jsonschema.ValidationError):
        admit(chat_platform(**spec))
