"""Drains, disruption budgets and readiness, as the operator writes them into the children.

- Probes: one backend's blip must not take every protocol pod out of the Service.
- PDB: an unhealthy pod must never block a node drain.
- Rollouts: the Deployment's own strategy (not the PDB) bounds the pods draining at once. A small
  model of the Deployment controller's rolling update (it does not count terminating pods against
  maxSurge) checks that bound with the strategy and minReadySeconds the operator writes.
- terminationGracePeriodSeconds: computed from the spec's drain window (tests/test_drain_hook.py
  runs the real hook against it).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from op_testkit import admit, chat_platform

from parley_operator import resources
from parley_operator.spec import parse_body

Obj = dict[str, Any]


def deployment(role: str = "protocol", replicas: int = 4, **spec: Any) -> Obj:
    body = admit(chat_platform(**spec))
    return resources.deployment(body, parse_body(body), role, replicas=replicas)


def protocol_container(dep: Obj) -> Obj:
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


def test_a_redis_or_database_blip_does_not_take_the_pods_out_of_the_service() -> None:
    probe = protocol_container(deployment())["readinessProbe"]
    # Out of the Service only after a failure that lasts: a shard's failover or a database
    # restart takes 5-10 s; one failed probe (failureThreshold 1) emptied the Service.
    assert probe["failureThreshold"] >= 3
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 15
    # The app answers within its own check timeout (1.5 s); the kubelet's default is 1 s.
    assert probe["timeoutSeconds"] >= 2
    # Back in as soon as one probe passes.
    assert probe.get("successThreshold", 1) == 1


def test_liveness_restarts_only_a_process_that_stopped_answering_for_a_while() -> None:
    probe = protocol_container(deployment())["livenessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    # A loop busy with a reconnect storm answers late; a restart would drop every socket.
    assert probe["timeoutSeconds"] >= 5
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 30


@pytest.mark.parametrize("role", resources.ROLES)
def test_an_unhealthy_pod_never_blocks_a_node_drain(role: str) -> None:
    body = admit(chat_platform())
    pdb = resources.pod_disruption_budget(body, role)
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("window", [10, 30, 90])
def test_the_grace_period_covers_the_hook_start_up_the_window_and_the_exit(window: int) -> None:
    pod = deployment(drain={"gracePeriodSeconds": window})["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace == (resources.DRAIN_HOOK_STARTUP_SECONDS + window + resources.DRAIN_HOOK_OVERRUN_SECONDS
                     + resources.SHUTDOWN_SECONDS)
    # The hook's start-up (Django on a throttled CPU) and Daphne's exit each get whole seconds.
    assert grace - window >= 20


# --- rollouts ---------------------------------------------------------------------------------------

def _surge(value: int | str, replicas: int) -> int:
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(int(value[:-1]) * replicas / 100)  # maxSurge rounds up
    return int(value)


def most_pods_draining(dep: Obj, replicas: int, start_up: int, drain: int) -> int:
    """Replay a rolling update second by second, as the Deployment controller runs it with
    maxUnavailable 0: the new ReplicaSet may grow while old + new pods (terminating ones not
    counted) stay within replicas + maxSurge; an old pod is deleted for each new pod available
    (ready for minReadySeconds) beyond `replicas`; a deleted pod drains for `drain` seconds.
    Returns the most pods draining at the same second."""
    strategy = dep["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    surge = _surge(strategy["maxSurge"], replicas)
    min_ready = dep["spec"].get("minReadySeconds", 0)
    old, new_ready_at, draining_until = replicas, [], []
    most = 0
    for now in range(100_000):
        while old + len(new_ready_at) < replicas + surge and len(new_ready_at) < replicas:
            new_ready_at.append(now + start_up)
        available = old + sum(now >= ready + min_ready for ready in new_ready_at)
        deletable = min(old, available - replicas)
        old -= deletable
        draining_until += [now + drain] * deletable
        draining_until = [until for until in draining_until if until > now]
        most = max(most, len(draining_until))
        if old == 0 and not draining_until:
            return most
    raise AssertionError("the rollout never finished")


@pytest.mark.parametrize("replicas", [2, 8, 50])
@pytest.mark.parametrize("window", [30, 90])
def test_a_rollout_drains_at_most_max_surge_pods_at_once(replicas: int, window: int) -> None:
    dep = deployment(replicas=replicas, drain={"gracePeriodSeconds": window})
    surge = _surge(dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"], replicas)
    # Worst case: clients that never leave, so each drain lasts its whole window (the hook's
    # start-up and overrun included); a new pod ready 8 s after its creation.
    drain = resources.DRAIN_HOOK_STARTUP_SECONDS + window + resources.DRAIN_HOOK_OVERRUN_SECONDS
    assert most_pods_draining(dep, replicas, start_up=8, drain=drain) <= surge
    # The same bound the capacity model plans the reconnect storm with.
    assert surge == math.ceil(0.25 * replicas)


def test_the_rollout_bound_would_not_hold_without_min_ready_seconds() -> None:
    # The model itself: without the wait, batches start while earlier ones drain.
    dep = deployment(replicas=50)
    dep["spec"].pop("minReadySeconds", None)
    assert most_pods_draining(dep, 50, start_up=8, drain=41) > _surge("25%", 50)


def test_workers_roll_without_waiting() -> None:
    # Workers hold no sockets: a SIGTERM and the batch in hand, nothing to space out.
    dep = deployment(role="worker")
    assert dep["spec"].get("minReadySeconds", 0) == 0
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
