"""A spec edit mid-scale: a lowered maxReplicas drains at the pace of any other scale-down.

Before, the converge step clamped replicas to the new max in one patch: maxReplicas 30 -> 5
drained 25 protocol pods at once, skipping maxScaleDownStep and the fresh pod-deletion-costs.
"""

from __future__ import annotations

import itertools

from op_testkit import Cluster, chat_platform, eventually
from test_integration import FAST, heartbeat

from parley_operator import scaling

POLICY = scaling.Policy(min_replicas=1, max_replicas=5, target=100, max_step_down=10, down_window=0)


def test_a_lowered_max_replicas_comes_down_one_step_at_a_time() -> None:
    # Load still wants 30: only the new maxReplicas pulls the count down, 10 per decision.
    steps = [30]
    while steps[-1] != 5:
        steps.append(scaling.decide(POLICY, steps[-1], 3000, now=100.0 * len(steps)).replicas)
    assert steps == [30, 20, 10, 5]


def test_a_lowered_max_replicas_is_paced_while_metrics_are_unknown() -> None:
    decision = scaling.decide(POLICY, 30, None, now=100.0)
    assert decision.replicas == 20
    assert decision.changed


def test_a_raised_min_replicas_adds_pods_at_once() -> None:
    # Adding pods drains nothing: the spec's order is followed in one decision.
    policy = scaling.Policy(min_replicas=25, max_replicas=30, target=100, max_step_up=2, up_window=0)
    assert scaling.decide(policy, 5, 100, now=100.0).replicas == 25


def test_the_scale_down_message_says_why_it_goes_below_what_load_wants() -> None:
    decision = scaling.decide(POLICY, 30, 3000, now=100.0)
    assert decision.reason == scaling.Reason.SCALE_DOWN
    assert "lowering to maxReplicas 5" in decision.message


async def test_lowering_max_replicas_from_30_to_5_never_drains_25_pods_in_one_patch(
    cluster: Cluster, operator: None, redis_url: str,
) -> None:
    # 3000 connections at 100 per pod: the load alone holds 30 pods.
    heartbeat(redis_url, "p1", "chat-protocol-a", 2000)
    heartbeat(redis_url, "p2", "chat-protocol-b", 1000)
    await cluster.create_platform(chat_platform(
        redis={"urls": [redis_url]}, scaling={**FAST, "maxScaleUpStep": 30},
        protocol={"minReplicas": 1, "maxReplicas": 30, "targetConnectionsPerPod": 100}))
    await eventually(lambda: cluster.exists("apps/v1/deployments", "chat-protocol"))
    labels = {"app.kubernetes.io/instance": "chat", "app.kubernetes.io/component": "protocol"}
    for pod in ("chat-protocol-a", "chat-protocol-b"):
        await cluster.create("/api/v1/namespaces/ns/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": "ns", "labels": labels, "resourceVersion": "1"}})
    await eventually(lambda: cluster.replicas("protocol") == 30)
    deployment = cluster.obj("apps/v1/deployments", "chat-protocol")
    before = len(deployment.history)

    await cluster.patch("/apis/parley.dev/v1alpha1/namespaces/ns/chatplatforms/chat",
                        {"spec": {"protocol": {"maxReplicas": 5}}})
    await eventually(lambda: cluster.replicas("protocol") == 5, timeout=15)

    counts = [30] + [v["spec"]["replicas"] for v in list(deployment.history)[before:] if v is not None]
    drops = [a - b for a, b in itertools.pairwise(counts) if b < a]
    assert drops and max(drops) <= 10, f"replicas went {counts}: a drop above maxScaleDownStep (10)"
    assert len(drops) >= 3  # 30 -> 20 -> 10 -> 5
    # The paced path is the one that ranks pods first: the deletion costs were written.
    pod = cluster.obj("v1/pods", "chat-protocol-a").raw
    assert pod["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] == "2000"
    assert not cluster.events("ScaledToBounds")
    await eventually(lambda: any("lowering to maxReplicas 5" in e["message"] for e in cluster.events("ScaledDown")))
